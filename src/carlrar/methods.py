"""Training methods: a config dataclass (its fields are CLI flags) and a ``training_step`` each, in a registry.

A method's ``training_step(model, batch, backward, scale)`` runs its forward/backward passes for one micro-batch
and returns scalars to log. ``scale`` is 1 / gradient-accumulation steps; ``backward`` is the accelerator's.
The loop in ``train.py`` owns everything else (optimiser, schedule, clipping, evaluation, checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F


@dataclass
class BaseConfig:
    """Plain fine-tuning: L_C only. No knobs of its own."""


class Base:
    """Cross-entropy on the clean input (the paper's fine-tuning baseline; L_C of Eq. 6–7)."""

    config_class = BaseConfig
    passes = 1  # forward+backward passes per example, for the throughput line

    def __init__(self, config, train_config=None, **_):
        self.config = config

    def training_step(self, model, batch, backward, scale: float = 1.0) -> dict[str, float]:
        out = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(out.logits, batch["labels"])
        backward(loss * scale)
        return {"loss": loss.item()}


METHODS: dict[str, type] = {"base": Base}


def config_classes() -> tuple[type, ...]:
    """Each registered method's config dataclass once (several methods may share one)."""
    return tuple(dict.fromkeys(m.config_class for m in METHODS.values()))
