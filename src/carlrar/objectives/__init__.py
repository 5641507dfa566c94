"""The paper's training objectives, each a small module whose docstring cites its equation."""

from carlrar.objectives.contrastive import ContrastiveLoss, MemoryBank, NegativeSampler, Projection

__all__ = ["ContrastiveLoss", "MemoryBank", "NegativeSampler", "Projection"]
