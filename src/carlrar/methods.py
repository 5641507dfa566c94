"""Training methods: a config dataclass (its fields are CLI flags) and a ``training_step`` each, in a registry.

A method's ``training_step(model, batch, backward, scale, step)`` runs its forward/backward passes for one
micro-batch and returns scalars to log. ``scale`` is 1 / gradient-accumulation steps; ``backward`` is the
accelerator's; ``step`` is the optimiser step about to be taken. The loop in ``train.py`` owns everything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from carlrar.perturb import ascent_step, init_delta


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class BaseConfig:
    """Plain fine-tuning: L_C only. No knobs of its own."""


@dataclass
class AdversarialConfig:
    """δ on the word embeddings (Eq. 1). Defaults: the paper's SST-2 FreeLB setting (Table 1)."""

    adv_init_mag: float = _f(0.6, "γ: magnitude of δ's random init (0: zero init)")
    adv_lr: float = _f(0.1, "α: ascent step size on δ (FGM: the single step's size)")
    adv_max_norm: float = _f(0.0, "ε: project δ onto ‖δ‖ ≤ ε per example (0: unbounded)")
    adv_steps: int = _f(2, "n: FreeLB passes / k: PGD ascent steps")
    adv_norm: str = _f("l2", "norm for init, step and projection: l2 or linf")
    adv_start_step: int = _f(0, "plain training before this optimiser step (guards against early NaNs)")
    adv_reuse_dropout: bool = _f(True, "same dropout masks in all FreeLB passes of a batch, as the official code")
    pgd_clean: bool = _f(False, "PGD: train on (L_C(clean) + L_C(adversarial)) / 2 instead of the adversarial only")


def _inner(model):
    """The module under a DistributedDataParallel wrapper (ascent passes need no gradient sync)."""
    return getattr(model, "module", model)


class Base:
    """Plain fine-tuning: cross-entropy on the clean input (L_C, Eq. 8)."""

    config_class = BaseConfig

    def __init__(self, config, **_):
        self.config = config

    @property
    def passes(self) -> float:
        """Forward+backward passes per example, for the throughput line."""
        return 1

    def training_step(self, model, batch, backward, scale: float = 1.0, step: int = 0) -> dict[str, float]:
        out = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(out.logits, batch["labels"])
        backward(loss * scale)
        return {"loss": loss.item()}


class FreeLB(Base):
    """FreeLB (Zhu et al. 2020) as the official HF example: n passes on E + δ, parameter gradients of every pass
    accumulate with weight 1/n, δ takes a normalised ascent step between passes (none after the last)."""

    config_class = AdversarialConfig

    @property
    def passes(self):
        return self.config.adv_steps

    def delta0(self, model, batch) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        dim = _inner(model).word_embeddings.embedding_dim
        return init_delta(torch.empty(*ids.shape, dim), mask, self.config.adv_init_mag, self.config.adv_norm)

    def training_step(self, model, batch, backward, scale=1.0, step=0):
        c = self.config
        if step < c.adv_start_step:
            return super().training_step(model, batch, backward, scale, step)
        mask, labels = batch["attention_mask"], batch["labels"]
        delta = self.delta0(model, batch)
        rng = torch.get_rng_state()
        total = 0.0
        for t in range(c.adv_steps):
            if c.adv_reuse_dropout:
                torch.set_rng_state(rng)  # identical ops and shapes → identical dropout masks in every pass
            delta.requires_grad_()
            out = model(batch["input_ids"], mask, delta=delta)  # embeddings recomputed from ids each pass
            loss = F.cross_entropy(out.logits, labels)
            backward(loss * scale / c.adv_steps)
            total += loss.item() / c.adv_steps
            if t < c.adv_steps - 1:
                delta = ascent_step(delta, delta.grad, mask, c.adv_lr, c.adv_max_norm, c.adv_norm)
        return {"loss": total}


class PGD(FreeLB):
    """PGD adversarial training (Madry et al. 2018): k ascent steps on δ with parameter gradients discarded, then
    one training pass on the final δ (optionally averaged with the clean loss)."""

    @property
    def passes(self):
        return self.config.adv_steps + 1 + self.config.pgd_clean

    def training_step(self, model, batch, backward, scale=1.0, step=0):
        c = self.config
        if step < c.adv_start_step:
            return Base.training_step(self, model, batch, backward, scale, step)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        delta = self.delta0(model, batch)
        for _ in range(c.adv_steps):
            delta.requires_grad_()
            loss = F.cross_entropy(_inner(model)(ids, mask, delta=delta).logits, labels)
            (grad,) = torch.autograd.grad(loss, delta)  # only δ's gradient: parameters untouched
            delta = ascent_step(delta, grad, mask, c.adv_lr, c.adv_max_norm, c.adv_norm)
        loss = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
        logs = {"loss_adv": loss.item()}
        if c.pgd_clean:
            clean = F.cross_entropy(model(ids, mask).logits, labels)
            logs["loss_clean"] = clean.item()
            loss = (loss + clean) / 2
        backward(loss * scale)
        return {"loss": loss.item(), **logs}


class FGM(FreeLB):
    """FGM adversarial training (Miyato et al. 2017): clean pass, one normalised step of size α from δ = 0, then an
    adversarial pass; L_C(clean) + L_C(adversarial)."""

    @property
    def passes(self):
        return 2

    def training_step(self, model, batch, backward, scale=1.0, step=0):
        c = self.config
        if step < c.adv_start_step:
            return Base.training_step(self, model, batch, backward, scale, step)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        dim = _inner(model).word_embeddings.embedding_dim
        delta = torch.zeros(*ids.shape, dim, requires_grad=True)
        clean = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
        backward(clean * scale)
        delta = ascent_step(delta, delta.grad, mask, c.adv_lr, c.adv_max_norm, c.adv_norm)
        adv = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
        backward(adv * scale)
        return {"loss": clean.item() + adv.item(), "loss_clean": clean.item(), "loss_adv": adv.item()}


METHODS: dict[str, type] = {"base": Base, "freelb": FreeLB, "pgd": PGD, "fgm": FGM}


def config_classes() -> tuple[type, ...]:
    """Each registered method's config dataclass once (several methods share one)."""
    return tuple(dict.fromkeys(m.config_class for m in METHODS.values()))
