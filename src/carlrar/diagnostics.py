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


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_gradients(model, loss: torch.Tensor) -> list[torch.Tensor | None]:
    """∂loss/∂θ per trainable parameter (None: it gets none); the graph is kept for the real backward."""
    return list(torch.autograd.grad(loss, [p for _, p in trainable(model)], retain_graph=True, allow_unused=True))


def gradient_logs(model, grads: dict[str, list[torch.Tensor | None]]) -> dict[str, float]:
    """``grad_<term>[_<group>]`` norms and ``cos_<a>_<b>[_<group>]`` cosines of per-parameter gradients, from dot
    products summed per group (no gradient-sized concatenation: on MiniLM that took longer than the backward)."""
    groups = [group_of(n) for n, _ in trainable(model)]

    def dots(a, b) -> dict[str, float]:
        out = dict.fromkeys(GROUPS, 0.0)
        for group, x, y in zip(groups, a, b):
            if x is not None and y is not None:  # summed on the device, read once per group (no sync per tensor)
                # torch's summation (cascaded), not BLAS's dot: over an 11.7M-row embedding matrix a float32 dot
                # read norms 0.2 % high
                out[group] = out[group] + (x.float() * y.float()).sum()
        return {group: float(v) for group, v in out.items()}

    def cos(dot, x, y):
        return dot / max(math.sqrt(x * y), 1e-8)  # torch's cosine_similarity's eps

    squares = {name: dots(g, g) for name, g in grads.items()}
    logs = {}
    for name, sq in squares.items():
        logs[f"grad_{name}"] = math.sqrt(sum(sq.values()))
        logs.update({f"grad_{name}_{group}": math.sqrt(sq[group]) for group in GROUPS})
    for a, b in itertools.combinations(grads, 2):
        ab = dots(grads[a], grads[b])
        logs[f"cos_{a}_{b}"] = cos(sum(ab.values()), sum(squares[a].values()), sum(squares[b].values()))
        logs.update({f"cos_{a}_{b}_{group}": cos(ab[group], squares[a][group], squares[b][group]) for group in GROUPS})
    return logs


def term_gradients(model, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """For named unweighted losses (e.g. ``{"C": L_C, "D": L_D}``): each one's gradient taken separately, then
    ``gradient_logs``. Scalars only: they go to the run's diagnostics.jsonl."""
    return gradient_logs(model, {name: parameter_gradients(model, loss) for name, loss in losses.items()})


def backward_factor(backward, device) -> float:
    """What ``backward`` multiplies a loss's gradient by (1 for a plain ``.backward()``; fp16's loss scale, or a
    gradient-accumulation divisor, in other loops), read off a throw-away scalar."""
    probe = torch.ones((), device=device, requires_grad=True)
    backward(probe * 1.0)
    return float(probe.grad)


def diagnosed_backward(model, losses: dict[str, torch.Tensor], weights: dict[str, float], total: torch.Tensor,
                       scale: float, backward) -> dict[str, float]:
    """The pass's training backward of ``total`` (= ``scale · Σ weights[k] · losses[k]``), and
    ``term_gradients(model, losses)`` at the cost of one backward fewer: every loss's gradient but the last is
    taken separately; the last is the backward's own gradient (kept apart from what earlier passes accumulated in
    ``.grad``, then added back to it, bit for bit as the backward alone would) minus the others, over its weight.
    Exact up to float rounding; a last weight near 0 would amplify that rounding, and a total the weighted losses
    do not add up to (a term that adds to the pass loss without naming its raw loss) would make the remainder
    wrong, so then the last is taken separately too."""
    names = list(losses)
    named_total = float(sum(weights[k] * losses[k].detach() for k in names)) * scale
    accounted = math.isclose(named_total, float(total.detach()), rel_tol=1e-5, abs_tol=1e-8)
    last = names[-1] if accounted and abs(weights[names[-1]]) > 1e-3 else None
    grads = {name: parameter_gradients(model, losses[name]) for name in names if name != last}
    factor = backward_factor(backward, next(model.parameters()).device) * scale if last else 1.0
    params = [p for _, p in trainable(model)]
    earlier = [p.grad for p in params]
    for p in params:
        p.grad = None
    backward(total)
    if last:
        rest = []
        for i, p in enumerate(params):
            own = None if p.grad is None else p.grad / factor
            for k, g in grads.items():
                if g[i] is not None:
                    own = -weights[k] * g[i] if own is None else own - weights[k] * g[i]
            rest.append(None if own is None else own / weights[last])
        grads[last] = rest
    for p, before in zip(params, earlier):
        if before is not None:
            p.grad = before if p.grad is None else p.grad.add_(before)  # a + b == b + a: as if accumulated
    return gradient_logs(model, {name: grads[name] for name in names})
