"""δ on the word embeddings (Eq. 1): FreeLB's step with its objective terms, and PGD, FGM and plain fine-tuning.

Each step function runs one micro-batch's forward and backward passes and returns scalars to log; ``backward`` is
the accelerator's, ``scale`` is 1 / gradient-accumulation steps (times the rows weighting on several processes),
``step`` is the optimiser step about to be taken. Every tensor a step creates lives on the batch's device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from carlrar.config import Limits, check, config_field as _f
from carlrar.diagnostics import diagnosed_backward
from carlrar.perturb import ascent_step, init_delta


@dataclass
class AdversarialConfig:
    """δ on the word embeddings (Eq. 1). Defaults: the paper's SST-2 FreeLB setting (Table 1)."""

    adv_init_mag: float = _f(0.6, "γ: magnitude of δ's random init (0: zero init)")
    adv_lr: float = _f(0.1, "α: ascent step size on δ (FGM: the single step's size)")
    adv_max_norm: float = _f(0.0, "ε: project δ onto ‖δ‖ ≤ ε per example (0: unbounded)")
    adv_steps: int = _f(2, "n: FreeLB passes / k: PGD ascent steps")
    adv_norm: str = _f("l2", "norm for init, step and projection: l2 or linf", choices=["l2", "linf"])
    adv_start_step: int = _f(0, "plain training before this optimiser step (guards against early NaNs)")
    adv_reuse_dropout: bool = _f(True, "same dropout masks in all FreeLB passes of a batch, as the official code")
    pgd_clean: bool = _f(False, "PGD: train on (L_C(clean) + L_C(adversarial)) / 2 instead of the adversarial only")

    LIMITS: ClassVar[Limits] = Limits(minimum={"adv_steps": 1, "adv_init_mag": 0, "adv_lr": 0, "adv_max_norm": 0,
                                               "adv_start_step": 0})

    def __post_init__(self):
        check(self)


class DropoutReplay:
    """The same dropout masks in every pass of a step, as the official FreeLB code (its patched ALBERT reuses the
    masks). The RNG state of the CPU and of ``device`` is taken once; ``same_masks()`` restores it before a pass, so
    identical ops on identical shapes draw identical masks. Disabled, it does nothing."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.module = torch.get_device_module(device) if device.type != "cpu" else None
        self.device = device
        self.cpu_state = torch.get_rng_state() if enabled else None
        self.device_state = self.module.get_rng_state(device) if enabled and self.module is not None else None

    @contextlib.contextmanager
    def same_masks(self):
        if self.enabled:
            torch.set_rng_state(self.cpu_state)
            if self.module is not None:
                self.module.set_rng_state(self.device_state, self.device)
        yield


def new_delta(model, batch, init_mag: float, norm: str) -> torch.Tensor:
    """δ's initial value (Eq. 1's starting point) for a batch, on its device; float32 also under --mixed_precision
    (autocast casts E + δ where a matmul reads it, while δ and its ascent steps keep full precision)."""
    ids = batch["input_ids"]
    embeds = torch.empty(*ids.shape, model.word_embeddings.embedding_dim, device=ids.device, dtype=torch.float32)
    return init_delta(embeds, batch["attention_mask"], init_mag, norm)


def base_step(model, batch, backward, adv=None, terms=(), scale: float = 1.0, step: int = 0,
              diagnose: bool = False) -> dict[str, float]:
    """Plain fine-tuning: cross-entropy on the clean input (L_C, Eq. 8)."""
    loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
    backward(loss * scale)
    return {"loss": loss.item()}


def freelb_step(model, batch, backward, adv: AdversarialConfig, terms=(), scale: float = 1.0, step: int = 0,
                diagnose: bool = False) -> dict[str, float]:
    """FreeLB (Zhu et al. 2020, https://arxiv.org/abs/1909.11764) as its official Hugging Face example, plus
    objective terms. n passes on E + δ; pass t's loss is L_C / n (Eq. 8) plus each term's (RAR: w_r·L_R / n,
    Eq. 7; CARL: w·L_D on the last pass, Eq. 2–6); parameter gradients accumulate over the passes; δ takes a
    normalised ascent step between passes (Eq. 1), by default on the whole pass loss (a term may keep out of it);
    none after the last; then the terms' updates (Eq. 5). ``diagnose``: the last pass's per-term gradients."""
    for term in terms:
        term.begin(batch, step)
    if step < adv.adv_start_step:
        return base_step(model, batch, backward, scale=scale)
    ids, mask, labels, n = batch["input_ids"], batch["attention_mask"], batch["labels"], adv.adv_steps
    delta = new_delta(model, batch, adv.adv_init_mag, adv.adv_norm)
    replay = DropoutReplay(ids.device, adv.adv_reuse_dropout)
    logs, updates = {"loss": 0.0}, []
    for t in range(n):
        delta.requires_grad_()
        with replay.same_masks():
            out = model(ids, mask, delta=delta)  # embeddings recomputed from the ids on every pass
        loss = F.cross_entropy(out.logits, labels)
        extra, ascending, held_out, raw, weights = 0.0, 0.0, False, {"C": loss}, {"C": 1 / n}
        for term in terms:
            part = term.pass_loss(model, batch, out, t, n, replay, loss)
            extra = extra + part.value
            ascending, held_out = (ascending + part.value, held_out) if part.ascend else (ascending, True)
            updates += [part.after_backward] if part.after_backward else []
            raw.update(part.raw)
            weights.update({k: part.weight for k in part.raw})
            for k, v in part.logs.items():
                logs[k] = logs.get(k, 0.0) + v
        ascent_grad = None
        if held_out and t < n - 1:  # δ ascends only the terms of the inner max (e.g. Eq. 7's: L_C alone)
            (ascent_grad,) = torch.autograd.grad(loss / n + ascending, delta, retain_graph=True)
        total = (loss / n + extra) * scale
        if diagnose and t == n - 1:  # the last pass's backward, and its per-term gradients beside it
            logs.update({f"diag/{k}": v for k, v in diagnosed_backward(model, raw, weights, total, scale,
                                                                       backward).items()})
        else:
            backward(total)
        logs["loss"] += loss.item() / n
        if t < n - 1:
            ascent_grad = delta.grad if ascent_grad is None else ascent_grad
            delta = ascent_step(delta, ascent_grad, mask, adv.adv_lr, adv.adv_max_norm, adv.adv_norm)
    for update in updates:
        update()
    return logs


def pgd_step(model, batch, backward, adv: AdversarialConfig, terms=(), scale: float = 1.0, step: int = 0,
             diagnose: bool = False) -> dict[str, float]:
    """PGD adversarial training (Madry et al. 2018): k ascent steps on δ with parameter gradients discarded, then
    one training pass on the final δ (optionally averaged with the clean loss)."""
    if step < adv.adv_start_step:
        return base_step(model, batch, backward, scale=scale)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    delta = new_delta(model, batch, adv.adv_init_mag, adv.adv_norm)
    for _ in range(adv.adv_steps):
        delta.requires_grad_()
        loss = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
        (grad,) = torch.autograd.grad(loss, delta)  # only δ's gradient: parameters untouched
        delta = ascent_step(delta, grad, mask, adv.adv_lr, adv.adv_max_norm, adv.adv_norm)
    loss = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
    logs = {"loss_adv": loss.item()}
    if adv.pgd_clean:
        clean = F.cross_entropy(model(ids, mask).logits, labels)
        logs["loss_clean"] = clean.item()
        loss = (loss + clean) / 2
    backward(loss * scale)
    return {"loss": loss.item(), **logs}


def fgm_step(model, batch, backward, adv: AdversarialConfig, terms=(), scale: float = 1.0, step: int = 0,
             diagnose: bool = False) -> dict[str, float]:
    """FGM adversarial training (Miyato et al. 2017): clean pass, one normalised step of size α from δ = 0, then an
    adversarial pass; L_C(clean) + L_C(adversarial)."""
    if step < adv.adv_start_step:
        return base_step(model, batch, backward, scale=scale)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    delta = new_delta(model, batch, 0.0, adv.adv_norm).requires_grad_()
    clean = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
    backward(clean * scale)
    delta = ascent_step(delta, delta.grad, mask, adv.adv_lr, adv.adv_max_norm, adv.adv_norm)  # the one step
    adv_loss = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
    backward(adv_loss * scale)
    return {"loss": clean.item() + adv_loss.item(), "loss_clean": clean.item(), "loss_adv": adv_loss.item()}
