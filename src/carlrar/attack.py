"""Robustness evaluation as in the paper: k-PGD on the word embeddings, model in eval mode.

- Table 5: accuracy under attack for each ε (and the attack success rate on examples that were correct).
- Table 4: mean cosine similarity and Euclidean distance between R and R^adv (R = final [CLS] state) after k-PGD
  steps of size α with no projection, for each α (paper: 0.1 and 0.075).
- Margins (ours, beyond the paper): on the examples classified correctly, the clean logit margin (true label's logit
  minus the best other), how much the attack takes off it, and that drop per unit of ‖R − R^adv‖. An example flips
  when the drop exceeds its margin, so these say why R turning less (Table 4) need not mean fewer flips (Table 5):
  a method can shrink ‖R − R^adv‖ while the head reads what is left more steeply.
The attack uses the same perturbation engine as training (``carlrar.perturb``). ``AttackConfig`` is its one set of
knobs: the flags of ``carlrar attack`` / ``carlrar generate`` and the ``attack:`` section of a reproduce protocol.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from carlrar.config import Limits, check, config_field, from_mapping
from carlrar.data import Collator, EncodedSplit, eval_batches
from carlrar.perturb import ascent_step, init_delta, project


@dataclass
class AttackConfig:
    """The knobs of k-PGD for ``attack_split`` (via ``run_attack``); checked on creation, as one-line user errors."""

    eps: list[float] = field(default_factory=lambda: [0.02, 0.075, 0.1],
                             metadata={"help": "attack radii ε, comma-separated (Table 5)"})
    steps: int = config_field(10, "K: PGD steps")
    step_size: float | None = config_field(None, "step size α of the ε attacks (default ε/4)")
    norm: str = config_field("l2", "norm of the ascent step and of the ε-ball", choices=["l2", "linf"])
    init_mag: float = config_field(0.0, "random init magnitude (0: zero init)")
    distance_alphas: list[float] = field(default_factory=lambda: [0.1, 0.075], metadata={
        "help": "step sizes α of the unprojected R vs R^adv distances, comma-separated (Table 4; '' to skip)"})

    LIMITS: ClassVar[Limits] = Limits(minimum={"eps": 0, "distance_alphas": 0, "init_mag": 0, "steps": 0},
                                      above={"step_size": 0})

    def __post_init__(self):
        self.eps, self.distance_alphas = _as_list(self.eps), _as_list(self.distance_alphas)
        check(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> AttackConfig:
        """From a protocol's ``attack:`` mapping (keys as the fields, ``-`` or ``_``); missing keys keep defaults."""
        return from_mapping(cls, data, where)


def _as_list(values) -> list:
    """A copy as a list (a config never shares its caller's list); a YAML scalar is a list of one."""
    return list(values) if isinstance(values, (list, tuple)) else [values]


def pgd_attack(model, input_ids, attention_mask, labels, eps: float, steps: int, step_size: float,
               norm: str = "l2", init_mag: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-PGD: ``steps`` normalised ascent steps on δ from the init, projected onto ‖δ‖ ≤ ε (0: unbounded)."""
    shape = (*input_ids.shape, model.word_embeddings.embedding_dim)
    delta = torch.empty(shape, device=input_ids.device)
    delta = project(init_delta(delta, attention_mask, init_mag, norm, generator), eps, norm)
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
    clean_margin = torch.empty(n)
    margins = {i: torch.empty(n) for i in range(len(runs))}
    preds = {i: torch.empty(n, dtype=torch.long) for i in range(len(runs))}
    cos = {i: torch.empty(n) for i in range(len(runs))}
    dist = {i: torch.empty(n) for i in range(len(runs))}
    batches = eval_batches(encoded.lengths, batch_size)
    bar = tqdm(total=len(batches) * len(runs), desc="attack", disable=not (progress and sys.stderr.isatty()),
               leave=False)
    for done, idx in enumerate(batches, 1):
        b = collate([encoded[i] for i in idx])
        where = b["index"]  # results are gathered on the CPU; the batch goes to the model's device
        ids, mask, y = (b[k].to(model.device) for k in ("input_ids", "attention_mask", "labels"))
        with torch.no_grad():
            clean = model(ids, mask)
        clean_pred[where] = clean.logits.argmax(-1).cpu()
        clean_margin[where] = logit_margin(clean.logits, y).cpu()
        for r, (_, _, alpha, bound) in enumerate(runs):
            delta = pgd_attack(model, ids, mask, y, bound, steps, alpha, norm, init_mag, generator)
            with torch.no_grad():
                adv = model(ids, mask, delta=delta)
            preds[r][where] = adv.logits.argmax(-1).cpu()
            margins[r][where] = logit_margin(adv.logits, y).cpu()
            cos[r][where] = F.cosine_similarity(clean.R, adv.R, dim=-1).cpu()
            dist[r][where] = (clean.R - adv.R).norm(dim=-1).cpu()
            bar.update(1)
        if progress and bar.disable and 4 * done // len(batches) > 4 * (done - 1) // len(batches):  # a log: quarters
            print(f"attack: batch {done}/{len(batches)} ({n} examples, {len(runs)} radii)", file=sys.stderr, flush=True)
    bar.close()
    model.train(was_training)

    correct = clean_pred == labels
    result = {"n": n, "clean_accuracy": correct.float().mean().item(), "steps": steps, "norm": norm,
              "init_mag": init_mag, "mean_margin": _mean(clean_margin[correct]), "attacks": [], "distances": []}
    for r, (kind, value, alpha, bound) in enumerate(runs):
        row = {"step_size": alpha, "mean_cos": cos[r].mean().item(), "mean_euclid": dist[r].mean().item(),
               **margin_drop(clean_margin[correct], margins[r][correct], dist[r][correct])}
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
            "margin": [round(x, 4) for x in clean_margin.tolist()],
            "attacks": [{"eps": v, "correct": (preds[r] == labels).int().tolist(),
                         "cos": [round(x, 5) for x in cos[r].tolist()],
                         "margin": [round(x, 4) for x in margins[r].tolist()]} for r, (k, v, _, _) in enumerate(runs)
                        if k == "eps"],
            "distances": [{"alpha": v, "cos": [round(x, 5) for x in cos[r].tolist()]}
                          for r, (k, v, _, _) in enumerate(runs) if k == "alpha"]}
    return result


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example, the true label's logit minus the largest other logit: > 0 exactly when classified correctly
    (ties aside)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(-1).values


def _mean(x: torch.Tensor) -> float | None:
    return x.mean().item() if len(x) else None


def margin_drop(clean: torch.Tensor, adv: torch.Tensor, distance: torch.Tensor) -> dict:
    """On the clean-correct examples: the mean margin the attack takes off, and that drop per unit of ‖R − R^adv‖
    (a ratio of means: the head's slope along the attack, averaged over examples the way the table's mean_euclid
    is)."""
    drop, dist = _mean(clean - adv), _mean(distance)
    return {"mean_margin_drop": drop, "margin_drop_per_distance": drop / dist if drop is not None and dist else None}


def run_attack(model, encoded: EncodedSplit, pad_token_id: int, config: AttackConfig, batch_size: int = 64,
               seed: int = 0, progress: bool = True, per_example: bool = False) -> dict:
    """``attack_split`` with the knobs of an ``AttackConfig``: how the CLI and reproduce attack."""
    return attack_split(model, encoded, pad_token_id, config.eps, config.steps, config.step_size, config.norm,
                        config.distance_alphas, batch_size, config.init_mag, seed, progress, per_example)


def print_attack(result: dict, title: str):
    from rich.console import Console
    from rich.table import Table

    margin = result.get("mean_margin")
    table = Table(title=f"{title} · clean accuracy {result['clean_accuracy']:.4f}"
                        + (f" · mean margin {margin:.3f}" if margin is not None else "")
                        + f" · {result['steps']}-PGD ({result['norm']}) on {result['n']} examples")
    for col in ("ε", "step size", "accuracy under attack", "success rate", "cos(R, R^adv)", "‖R − R^adv‖",
                "margin drop", "drop / ‖R − R^adv‖"):
        table.add_column(col, justify="right")
    num = lambda x, digits=4: "–" if x is None else f"{x:.{digits}f}"  # noqa: E731
    for a in result["attacks"]:
        table.add_row(f"{a['eps']:g}", f"{a['step_size']:g}", f"{a['accuracy']:.4f}", f"{a['success_rate']:.4f}",
                      f"{a['mean_cos']:.4f}", f"{a['mean_euclid']:.4f}", num(a.get("mean_margin_drop"), 3),
                      num(a.get("margin_drop_per_distance"), 3))
    for d in result["distances"]:
        table.add_row("∞", f"{d['alpha']:g}", "", "", f"{d['mean_cos']:.4f}", f"{d['mean_euclid']:.4f}",
                      num(d.get("mean_margin_drop"), 3), num(d.get("margin_drop_per_distance"), 3))
    Console().print(table)
