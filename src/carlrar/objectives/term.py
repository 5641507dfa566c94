"""What an objective term is to a FreeLB step: the hooks, each with a no-op default.

A method is FreeLB plus a tuple of terms (``carlrar.methods``): CARL = (ContrastiveTerm,), RAR =
(ReconstructionTerm,), CARL + RAR = both. On each of FreeLB's n passes the step adds every term's ``pass_loss`` to
L_C / n before the backward; after the last backward it runs the updates the terms returned (CARL's bank update,
Eq. 5). The training loop calls ``before_step`` before each optimiser step (CARL's bank fill) and saves
``state_tensors`` in every checkpoint. A new variant is a new term, or a new option of one: nothing else changes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class TermLoss(NamedTuple):
    """One term's contribution to one pass: the value added to the pass loss (already weighted), scalars to log,
    an update to run once the step's last backward is done (it may still need tensors the backward reads), the
    unweighted loss by name for the gradient diagnostics, whether δ's ascent includes this term (False: the
    inner max is over the other terms only), and the factor of the raw loss in the value (value = weight · raw)."""

    value: torch.Tensor | float = 0.0
    logs: dict[str, float] = {}
    after_backward: Callable[[], None] | None = None
    raw: dict[str, torch.Tensor] = {}
    ascend: bool = True
    weight: float = 1.0


NOTHING = TermLoss()


class ObjectiveTerm:
    """Base class of the objective terms; every hook defaults to doing nothing."""

    select_after_step: int = 0  # best-dev checkpoints only after this step (before it, the model is plain FreeLB)

    @classmethod
    def from_run(cls, configs: dict[type, object], model, train_labels, total_steps: int, train_config):
        """The term for one training run: ``configs`` maps each config dataclass of the method to its instance."""
        raise NotImplementedError

    @property
    def extra_passes(self) -> int:
        """Forward+backward passes per example beyond FreeLB's n (for the throughput line)."""
        return 0

    def before_step(self, step: int, model, data, collate, batch_size: int) -> bool:
        """Work before optimiser step ``step`` (e.g. CARL's bank fill); True when it changed the term's state, so
        that the loop writes a checkpoint."""
        return False

    def begin(self, batch: dict, step: int):
        """Called once per micro-batch before its passes."""

    def pass_loss(self, model, batch: dict, out, t: int, n: int, replay, loss_C: torch.Tensor) -> TermLoss:
        """The term on pass ``t`` of ``n``; ``out`` is that pass's ClassifierOutput on E + δ; ``replay`` gives a
        forward of this pass the step's dropout masks (``with replay.same_masks(): ...``); ``loss_C`` is the
        pass's L_C (e.g. to balance a weight against its gradient)."""
        return NOTHING

    def after_evaluate(self, step: int, accuracy: float):
        """Called after each evaluation with the selection accuracy (validation, else dev), alike on every
        process (e.g. CARL's plateau start)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold beyond the model and optimiser."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]):
        """The inverse of ``state_tensors`` on resume."""


def balanced_weight(model, loss_C: torch.Tensor, loss: torch.Tensor, ratio: float, cap: float) -> float:
    """The weight w at which ‖∇(w·loss)‖ = ratio · ‖∇L_C‖ over the model's parameters, capped at ``cap`` (the
    paper's fixed weight): a term whose gradient dwarfs L_C's (L_D ≈ 49 × at CARL's start on MiniLM, GUIDE §2) is
    scaled down to the ratio, one that does not keeps the paper's weight. Two extra backward passes of one pass's
    graph (kept for the training backward)."""
    from carlrar.diagnostics import parameter_gradients
    from carlrar.distributed import all_mean

    norms = [torch.sqrt(sum((g.float() ** 2).sum() for g in parameter_gradients(model, value) if g is not None))
             for value in (loss_C, loss)]
    norm_C, norm = all_mean(torch.stack(norms)).tolist()  # one weight on every process
    return min(cap, ratio * norm_C / max(norm, 1e-12))
