"""Gradient diagnostics of the objective terms: how large each term's gradient is, where, and how it points.

On a diagnostic step (every ``--diagnostics_steps`` optimiser steps) FreeLB's last pass takes the gradient of each
unweighted loss it adds (L_C, L_D, L_R) separately with ``torch.autograd.grad`` (``retain_graph``; the training
backward is untouched) and reports, per module group and overall, each gradient's norm and the pairwise cosines.
This is what showed, on pretrained MiniLM, ‖∇L_D‖ ≈ 49 × ‖∇L_C‖ at a cosine of ≈ −0.06 (GUIDE §2): the measurement
is now in every run's ``diagnostics.jsonl`` instead of a one-off script. The cost, on one step in K, is one extra
backward of the last pass per term but one: the last term's gradient is what remains of the pass's own training
backward once the others are taken off (``diagnosed_backward``), so a FreeLB step costs no extra backward and CARL +
RAR two, not three (``benchmarks/diagnostics.py`` measures it).
"""

from __future__ import annotations

import itertools
import math

import torch

GROUPS = ("embeddings", "encoder", "top")  # top: pooler, classifier and the methods' heads


def group_of(name: str) -> str:
    """The module group of a parameter name of a Classifier (``hf.<arch>.embeddings...``, ``heads...``)."""
    if name.startswith("heads."):
        return "top"
    if ".embeddings." in name:
        return "embeddings"
    if ".encoder." in name:
        return "encoder"
    return "top"


def grouped(named, grads) -> dict[str, torch.Tensor]:
    """Gradients of the (name, parameter) pairs flattened per group (zeros where a parameter got none)."""
    out = {}
    for group in GROUPS:
        parts = [(g if g is not None else torch.zeros_like(p)).flatten()
                 for (n, p), g in zip(named, grads) if group_of(n) == group]
        out[group] = torch.cat(parts) if parts else torch.zeros(0)
    return out


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂loss/∂θ flattened per group; the graph is kept for the real backward."""
    named = trainable(model)
    return grouped(named, torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True))


def gradient_logs(flat: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """``grad_<term>[_<group>]`` norms and ``cos_<a>_<b>[_<group>]`` cosines of per-group flat gradients."""
    logs = {}
    for name, groups in flat.items():
        logs[f"grad_{name}"] = torch.cat(list(groups.values())).norm().item()
        for group, g in groups.items():
            logs[f"grad_{name}_{group}"] = g.norm().item()
    for a, b in itertools.combinations(flat, 2):
        whole = [torch.cat(list(flat[x].values())) for x in (a, b)]
        logs[f"cos_{a}_{b}"] = torch.nn.functional.cosine_similarity(*whole, dim=0).item()
        for group in GROUPS:
            logs[f"cos_{a}_{b}_{group}"] = torch.nn.functional.cosine_similarity(
                flat[a][group], flat[b][group], dim=0).item()
    return logs


def term_gradients(model, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """For named unweighted losses (e.g. ``{"C": L_C, "D": L_D}``): each one's gradient taken separately, then
    ``gradient_logs``. Scalars only: they go to the run's diagnostics.jsonl."""
    return gradient_logs({name: flat_gradients(model, loss) for name, loss in losses.items()})


def backward_factor(backward, device) -> float:
    """What ``backward`` multiplies a loss's gradient by (1 for a plain ``.backward()``; fp16's loss scale, or a
    gradient-accumulation divisor, in other loops), read off a throw-away scalar."""
    probe = torch.ones((), device=device, requires_grad=True)
    backward(probe * 1.0)
    return float(probe.grad)


def diagnosed_backward(model, losses: dict[str, torch.Tensor], weights: dict[str, float], total: torch.Tensor,
                       scale: float, backward) -> dict[str, float]:
    """The pass's training backward of ``total`` (= ``scale · Σ weights[k] · losses[k]``), and ``term_gradients(model, losses)``
    at the cost of one backward fewer: every loss's gradient but the last is taken separately; the last is the
    backward's own gradient (kept apart from what earlier passes accumulated in ``.grad``, then added back to it,
    bit for bit as the backward alone would) minus the others, over its weight. Exact up to float rounding; a last
    weight near 0 would amplify that rounding, and a total the weighted losses do not add up to (a term that adds to
    the pass loss without naming its raw loss) would make the remainder wrong, so then the last is taken separately
    too."""
    names = list(losses)
    named_total = float(sum(weights[k] * losses[k].detach() for k in names)) * scale
    accounted = math.isclose(named_total, float(total.detach()), rel_tol=1e-5, abs_tol=1e-8)
    last = names[-1] if accounted and abs(weights[names[-1]]) > 1e-3 else None
    flat = {name: flat_gradients(model, losses[name]) for name in names if name != last}
    factor = backward_factor(backward, next(model.parameters()).device) * scale if last else 1.0
    named = trainable(model)
    earlier = [p.grad for _, p in named]
    for _, p in named:
        p.grad = None
    backward(total)
    own = [p.grad for _, p in named]
    if last:
        passed = grouped(named, own)
        flat[last] = {g: (passed[g] / factor - sum(weights[k] * flat[k][g] for k in flat)) / weights[last]
                      for g in GROUPS}
    for (_, p), before in zip(named, earlier):
        if before is not None:
            p.grad = before if p.grad is None else p.grad.add_(before)  # a + b == b + a: as if accumulated
    return gradient_logs({name: flat[name] for name in names})
