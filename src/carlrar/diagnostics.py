"""Gradient diagnostics of the objective terms: how large each term's gradient is, where, and how it points.

On a diagnostic step (every ``--diagnostics_steps`` optimiser steps) FreeLB's last pass takes the gradient of each
unweighted loss it adds (L_C, L_D, L_R) separately with ``torch.autograd.grad`` (``retain_graph``; the training
backward is untouched) and reports, per module group and overall, each gradient's norm and the pairwise cosines.
This is what showed, on pretrained MiniLM, ‖∇L_D‖ ≈ 49 × ‖∇L_C‖ at a cosine of ≈ −0.06 (GUIDE §2): the measurement
is now in every run's ``diagnostics.jsonl`` instead of a one-off script. The cost is one extra backward of the last
pass per term, on one step in K (``benchmarks/diagnostics.py`` measures it).
"""

from __future__ import annotations

import itertools

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


def flat_gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂loss/∂θ flattened per group (zeros where a group gets none); the graph is kept for the real backward."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    out = {}
    for group in GROUPS:
        parts = [(g if g is not None else torch.zeros_like(p)).flatten()
                 for (n, p), g in zip(named, grads) if group_of(n) == group]
        out[group] = torch.cat(parts) if parts else torch.zeros(0)
    return out


def term_gradients(model, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """For named unweighted losses (e.g. ``{"C": L_C, "D": L_D}``): ``grad_<term>[_<group>]`` norms and
    ``cos_<a>_<b>[_<group>]`` cosines. Scalars only: they go to the run's diagnostics.jsonl."""
    flat = {name: flat_gradients(model, loss) for name, loss in losses.items()}
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
