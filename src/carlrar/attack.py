"""Robustness evaluation as in the paper: k-PGD on the word embeddings, model in eval mode.

- Table 5: accuracy under attack for each ε (and the attack success rate on examples that were correct).
- Table 4: mean cosine similarity and Euclidean distance between R and R^adv (R = final [CLS] state) after k-PGD
  steps of size α with no projection, for each α (paper: 0.1 and 0.075).
The attack uses the same perturbation engine as training (``carlrar.perturb``).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from carlrar.data import Collator, EncodedSplit, eval_batches
from carlrar.perturb import ascent_step, init_delta, project


def pgd_attack(model, input_ids, attention_mask, labels, eps: float, steps: int, step_size: float,
               norm: str = "l2", init_mag: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-PGD: ``steps`` normalised ascent steps on δ from the init, projected onto ‖δ‖ ≤ ε (0: unbounded)."""
    shape = (*input_ids.shape, model.word_embeddings.embedding_dim)
    delta = project(init_delta(torch.empty(shape), attention_mask, init_mag, norm, generator), eps, norm)
    for _ in range(steps):
        delta.requires_grad_()
        logits = model(input_ids, attention_mask, delta=delta).logits
        # summed, not averaged: each example's step is its own, whatever the batch size
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), delta)
        delta = ascent_step(delta, grad, attention_mask, step_size, eps, norm)
    return delta.detach()


def attack_split(model, encoded: EncodedSplit, pad_token_id: int, eps: list[float], steps: int = 10,
                 step_size: float | None = None, norm: str = "l2", distance_alphas: list[float] = (),
                 batch_size: int = 64, init_mag: float = 0.0, seed: int = 0, progress: bool = True,
                 per_example: bool = False) -> dict:
    """Clean accuracy, then per ε: accuracy under k-PGD, success rate, cos / Euclid of R vs R^adv; per α: the
    Table 4 distances. ``step_size`` None → ε / 4 for each ε. ``per_example`` adds each example's correctness and
    cos(R, R^adv) (paired bootstrap, histograms)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    collate = Collator(pad_token_id)
    labels = torch.tensor(encoded.labels)
    n = len(encoded)
    runs = [("eps", e, step_size if step_size else e / 4, e) for e in eps] + \
           [("alpha", a, a, 0.0) for a in distance_alphas]
    clean_pred = torch.empty(n, dtype=torch.long)
    preds = {i: torch.empty(n, dtype=torch.long) for i in range(len(runs))}
    cos = {i: torch.empty(n) for i in range(len(runs))}
    dist = {i: torch.empty(n) for i in range(len(runs))}
    batches = eval_batches(encoded.lengths, batch_size)
    bar = tqdm(total=len(batches) * len(runs), desc="attack", disable=not (progress and sys.stderr.isatty()),
               leave=False)
    for idx in batches:
        b = collate([encoded[i] for i in idx])
        ids, mask, y, where = b["input_ids"], b["attention_mask"], b["labels"], b["index"]
        with torch.no_grad():
            clean = model(ids, mask)
        clean_pred[where] = clean.logits.argmax(-1)
        for r, (_, _, alpha, bound) in enumerate(runs):
            delta = pgd_attack(model, ids, mask, y, bound, steps, alpha, norm, init_mag, generator)
            with torch.no_grad():
                adv = model(ids, mask, delta=delta)
            preds[r][where] = adv.logits.argmax(-1)
            cos[r][where] = F.cosine_similarity(clean.R, adv.R, dim=-1)
            dist[r][where] = (clean.R - adv.R).norm(dim=-1)
            bar.update(1)
    bar.close()
    model.train(was_training)

    correct = clean_pred == labels
    result = {"n": n, "clean_accuracy": correct.float().mean().item(), "steps": steps, "norm": norm,
              "init_mag": init_mag, "attacks": [], "distances": []}
    for r, (kind, value, alpha, bound) in enumerate(runs):
        row = {"step_size": alpha, "mean_cos": cos[r].mean().item(), "mean_euclid": dist[r].mean().item()}
        if kind == "eps":
            still = preds[r] == labels
            flipped = (correct & ~still).sum().item()
            row = {"eps": value, **row, "accuracy": still.float().mean().item(),
                   "success_rate": flipped / max(correct.sum().item(), 1)}
            result["attacks"].append(row)
        else:
            result["distances"].append({"alpha": value, **row})
    if per_example:
        result["per_example"] = {
            "clean_correct": correct.int().tolist(),
            "attacks": [{"eps": v, "correct": (preds[r] == labels).int().tolist(),
                         "cos": [round(x, 5) for x in cos[r].tolist()]} for r, (k, v, _, _) in enumerate(runs)
                        if k == "eps"],
            "distances": [{"alpha": v, "cos": [round(x, 5) for x in cos[r].tolist()]}
                          for r, (k, v, _, _) in enumerate(runs) if k == "alpha"]}
    return result


def print_attack(result: dict, title: str):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} · clean accuracy {result['clean_accuracy']:.4f} · {result['steps']}-PGD "
                        f"({result['norm']}) on {result['n']} examples")
    for col in ("ε", "step size", "accuracy under attack", "success rate", "cos(R, R^adv)", "‖R − R^adv‖"):
        table.add_column(col, justify="right")
    for a in result["attacks"]:
        table.add_row(f"{a['eps']:g}", f"{a['step_size']:g}", f"{a['accuracy']:.4f}", f"{a['success_rate']:.4f}",
                      f"{a['mean_cos']:.4f}", f"{a['mean_euclid']:.4f}")
    for d in result["distances"]:
        table.add_row("∞", f"{d['alpha']:g}", "", "", f"{d['mean_cos']:.4f}", f"{d['mean_euclid']:.4f}")
    Console().print(table)
