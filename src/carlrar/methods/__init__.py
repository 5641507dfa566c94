"""Training methods: a registry of (config dataclasses, step function, objective terms).

A method is one of four step functions (``methods/adversarial.py``) and, for FreeLB, the objective terms its passes
add (``carlrar.objectives``): FreeLB = no terms, CARL = the contrastive term, RAR = the reconstruction term,
CARL + RAR = both. The config dataclasses' fields are the method's CLI flags and YAML keys. ``Method`` builds a
registered method for one run and gives the training loop its hooks, each with a default, so the loop never probes.

Adding a variant: a new option in a term's config (and its use in the term), or a new term and one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from carlrar.methods.adversarial import (AdversarialConfig, DropoutReplay, base_step, fgm_step, freelb_step,
                                         new_delta, pgd_step)
from carlrar.objectives.contrastive import ContrastiveConfig, ContrastiveTerm
from carlrar.objectives.reconstruction import ReconstructionConfig, ReconstructionTerm


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: what ``carlrar methods`` prints, the step, its configs, its terms, passes per example."""

    doc: str
    step: Callable
    config_classes: tuple[type, ...] = ()
    terms: tuple[type, ...] = ()  # ObjectiveTerm classes, built in this order (their heads join the model in it)
    passes: Callable[[AdversarialConfig | None], int] = lambda adv: 1  # FreeLB's n for the throughput line


ADV = (AdversarialConfig,)
METHODS: dict[str, MethodSpec] = {
    "base": MethodSpec("Plain fine-tuning: cross-entropy on the clean input (L_C, Eq. 8).", base_step),
    "freelb": MethodSpec("FreeLB (Zhu et al. 2020): n passes on E + δ, gradients of every pass accumulated.",
                         freelb_step, ADV, passes=lambda adv: adv.adv_steps),
    "pgd": MethodSpec("PGD adversarial training (Madry et al. 2018): k ascent steps, then one training pass.",
                      pgd_step, ADV, passes=lambda adv: adv.adv_steps + 1 + adv.pgd_clean),
    "fgm": MethodSpec("FGM adversarial training (Miyato et al. 2017): L_C(clean) + L_C(one normalised step).",
                      fgm_step, ADV, passes=lambda adv: 2),
    "carl": MethodSpec("CARL: FreeLB + contrastive loss between R and R^adv, negatives from memory banks (Eq. 2–6).",
                       freelb_step, (*ADV, ContrastiveConfig), (ContrastiveTerm,), lambda adv: adv.adv_steps),
    "rar": MethodSpec("RAR: FreeLB + reconstruction of the original tokens from adversarial states (Eq. 7).",
                      freelb_step, (*ADV, ReconstructionConfig), (ReconstructionTerm,), lambda adv: adv.adv_steps),
    "carl-rar": MethodSpec("CARL and RAR together: L_C + w_r·L_R on every pass, + L_D on the last (not in the paper).",
                           freelb_step, (*ADV, ContrastiveConfig, ReconstructionConfig),
                           (ContrastiveTerm, ReconstructionTerm), lambda adv: adv.adv_steps),
}


def config_classes() -> tuple[type, ...]:
    """Every registered method's config dataclasses, each once (methods share them)."""
    return tuple(dict.fromkeys(c for m in METHODS.values() for c in m.config_classes))


class Method:
    """A registered method built for one run: its step with its configs and terms, and the loop's hooks.

    Building it may add heads to ``model`` (RAR's reconstructor, CARL's projection): build it before the
    optimiser, after the model is on its device."""

    def __init__(self, name: str, *configs, model=None, train_labels=(), total_steps: int = 0, train_config=None):
        self.name, self.spec = name, METHODS[name]
        by_class = {type(c): c for c in configs}
        self.configs = {c: by_class.get(c) or c() for c in self.spec.config_classes}
        self.adv = self.configs.get(AdversarialConfig)
        self.terms = tuple(t.from_run(self.configs, model, train_labels, total_steps, train_config)
                           for t in self.spec.terms)

    @property
    def passes(self) -> int:
        """Forward+backward passes per example, for the throughput line."""
        return self.spec.passes(self.adv) + sum(t.extra_passes for t in self.terms)

    @property
    def select_after_step(self) -> int:
        """Best-dev checkpoints only after this step (CARL is plain FreeLB before its start step)."""
        return max((t.select_after_step for t in self.terms), default=0)

    def term(self, cls: type):
        """This run's term of class ``cls`` (e.g. ``ContrastiveTerm``), or None."""
        return next((t for t in self.terms if isinstance(t, cls)), None)

    def training_step(self, model, batch, backward, scale: float = 1.0, step: int = 0,
                      diagnose: bool = False) -> dict[str, float]:
        """One micro-batch's passes; with ``diagnose``, FreeLB also returns ``diag/*`` gradient diagnostics."""
        return self.spec.step(model, batch, backward, self.adv, self.terms, scale, step, diagnose=diagnose)

    def before_step(self, step: int, model, data, collate, batch_size: int) -> bool:
        """Every term's work before optimiser step ``step``; True when any changed state (the loop checkpoints)."""
        return any([t.before_step(step, model, data, collate, batch_size) for t in self.terms])  # all of them run

    def after_evaluate(self, step: int, accuracy: float):
        for t in self.terms:
            t.after_evaluate(step, accuracy)

    def state_tensors(self):
        return {k: v for t in self.terms for k, v in t.state_tensors().items()}

    def load_state_tensors(self, state):
        for t in self.terms:
            t.load_state_tensors(state)


__all__ = ["METHODS", "Method", "MethodSpec", "config_classes", "AdversarialConfig", "ContrastiveConfig",
           "ReconstructionConfig", "DropoutReplay", "base_step", "freelb_step", "pgd_step", "fgm_step", "new_delta"]
