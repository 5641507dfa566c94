"""One perturbation engine for FreeLB, PGD / FGM training and the k-PGD attack: δ on the word embeddings.

δ has the shape of the word embeddings (batch × len × embedding size; ALBERT: 128, not the hidden size) and is zero
at padding positions. Norms are per example over the flattened len × dim, as in the official FreeLB code
(zhuchen03/FreeLB, ``run_glue_freelb.py``):

- init (Eq. 1's starting point): zero; L2: uniform(−1, 1) · mask · γ / sqrt(L·d), L = the example's real tokens;
  L∞: uniform(−γ, γ) · mask.
- step: δ ← δ + α · g / ‖g‖ per example (L2 norm; L∞: divide by max |g|, not a sign step).
- projection onto ‖δ‖ ≤ ε: L2 rescales the examples outside the ball, L∞ clamps element-wise; ε = 0: unbounded.
"""

from __future__ import annotations

import torch

NORMS = ("l2", "linf")


def _per_example(x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-example scalar (shape batch) over batch × len × dim."""
    return x.view(-1, *([1] * 2))


def init_delta(embeds: torch.Tensor, attention_mask: torch.Tensor, init_mag: float, norm: str = "l2",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial δ for ``embeds`` (batch × len × dim); zero when ``init_mag`` is 0."""
    mask = attention_mask.unsqueeze(2).to(embeds.dtype)
    if init_mag == 0:
        return torch.zeros_like(embeds)
    u = torch.rand(embeds.shape, generator=generator, dtype=embeds.dtype).to(embeds.device) * 2 - 1
    if norm == "l2":
        dims = attention_mask.sum(1).to(embeds.dtype) * embeds.size(-1)
        return u * mask * _per_example(init_mag / torch.sqrt(dims))
    if norm == "linf":
        return u * init_mag * mask
    raise ValueError(f"unknown norm {norm!r} (use one of {NORMS})")


def normalize_grad(grad: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """g / ‖g‖ per example (L2 over len × dim; L∞: max |g|), guarded against 0 with 1e-8 as in FreeLB."""
    flat = grad.reshape(grad.size(0), -1)
    size = flat.norm(p=2, dim=1) if norm == "l2" else flat.abs().max(dim=1).values
    return grad / _per_example(size.clamp(min=1e-8))


def project(delta: torch.Tensor, eps: float, norm: str = "l2") -> torch.Tensor:
    """Onto ‖δ‖ ≤ ε per example; ε ≤ 0 means unbounded (FreeLB's default)."""
    if eps <= 0:
        return delta
    if norm == "linf":
        return delta.clamp(-eps, eps)
    size = delta.reshape(delta.size(0), -1).norm(p=2, dim=1)
    scale = torch.where(size > eps, eps / size.clamp(min=1e-12), torch.ones_like(size))
    return delta * _per_example(scale)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor, step_size: float,
                eps: float, norm: str = "l2") -> torch.Tensor:
    """One normalised gradient-ascent step on δ, projected; padding positions neither count nor move."""
    mask = attention_mask.unsqueeze(2).to(delta.dtype)
    return project((delta + step_size * normalize_grad(grad * mask, norm)) * mask, eps, norm).detach()
