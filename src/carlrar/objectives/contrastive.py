"""CARL's contrastive objective (Eq. 2–5): memory banks, negatives of other labels, softmax and NCE estimators."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """One L2-normalised row per training example (by dataset index), updated with momentum (Eq. 5).

    ``update``: B[i] ← normalize(M·B[i] + (1 − M)·R_i), normalised after the mix as in CRD (Tian et al.), so rows
    stay on the unit sphere that the scores h(x, y) = exp(x·y / τ) assume. ``fill`` writes rows outright (the
    paper's bank-filling epoch). Rows start uniform in ±1/sqrt(d/3), normalised (CRD's init). Storage is
    N × d × bytes(dtype): fp16 halves it for large N; scores are always computed in fp32.

    Example::

        bank = MemoryBank(num_rows=5, dim=4, momentum=0.5)
        bank.update(torch.tensor([2]), F.normalize(torch.ones(1, 4), dim=1))
        bank(torch.tensor([[2, 3]])).shape  # (1, 2, 4)
    """

    def __init__(self, num_rows: int, dim: int, momentum: float = 0.5, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.momentum = momentum
        stdv = 1.0 / math.sqrt(dim / 3)
        rows = (torch.rand(num_rows, dim) * 2 - 1) * stdv
        self.register_buffer("rows", F.normalize(rows, dim=1).to(dtype))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows[index].float()

    @torch.no_grad()
    def update(self, index: torch.Tensor, vectors: torch.Tensor):
        mixed = self.momentum * self.rows[index].float() + (1 - self.momentum) * vectors.detach().float()
        self.rows[index] = F.normalize(mixed, dim=1).to(self.rows.dtype)

    @torch.no_grad()
    def fill(self, index: torch.Tensor, vectors: torch.Tensor):
        self.rows[index] = F.normalize(vectors.detach().float(), dim=1).to(self.rows.dtype)


class NegativeSampler:
    """m negatives per anchor, drawn uniformly (with replacement) from the examples whose label differs.

    Per-label pools of indices are built once, so a draw costs O(B·m) whatever N is. m is capped by the smallest
    pool (with a warning). Draws use torch's global RNG, which checkpoints restore.
    """

    def __init__(self, labels: list[int], m: int):
        labels = torch.as_tensor(labels)
        self.pools = {c: torch.nonzero(labels != c).squeeze(1) for c in labels.unique().tolist()}
        smallest = min(len(p) for p in self.pools.values())
        if m > smallest:
            warnings.warn(f"CARL: {m} negatives requested but only {smallest} examples of other labels exist "
                          f"for some label; using m = {smallest}", stacklevel=2)
        self.m = min(m, smallest)

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(labels), self.m, dtype=torch.long)
        for c in labels.unique().tolist():
            rows = labels == c
            pool = self.pools[c]
            out[rows] = pool[torch.randint(len(pool), (int(rows.sum()), self.m))]
        return out


class ContrastiveLoss(nn.Module):
    """L_D = L_D^o + L_D^a (Eq. 2–3) with h(x, y) = exp(x·y / τ) (Eq. 4) on L2-normalised representations.

    - L_D^a: anchor R^adv, positive R, negatives from B_orig.  L_D^o: anchor R, positive R^adv, negatives from
      B_adv. ``positive="live"`` uses the live R / R^adv as Eq. 2 does (gradient flows through both);
      ``positive="bank"`` uses the other view's bank row of the same example, as CRD does.
    - ``estimator="softmax"``: −log h⁺ / (h⁺ + Σ_j h⁻_j), exact over the sampled set (InfoNCE). We keep the positive
      in the denominator, as InfoNCE and CRD do; without it the loss has no lower bound.
    - ``estimator="nce"``: the NCE approximation the paper cites (Wu et al. 2018; Tian et al. CRD): P = h / Z,
      noise prior Pn = 1/N, loss −[log P⁺/(P⁺ + m·Pn) + Σ_j log m·Pn/(P⁻_j + m·Pn)]. Z is set on the first call to
      N·mean(h) (CRD) and, with ``z_momentum`` > 0, follows an exponential moving average of that (better
      behaved than CRD's fixed first-batch Z).

    Relations: InfoNCE / CPC (softmax), CRD (nce, bank positives); sentence-transformers' MultipleNegativesRanking
    loss is the softmax estimator with in-batch negatives instead of a memory bank.

    Example::

        loss = ContrastiveLoss(temperature=0.07)
        r, r_adv = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
        neg = F.normalize(torch.randn(2, 3, 4), dim=2)
        value, logs = loss(r, r_adv, neg_orig=neg, neg_adv=neg)
    """

    def __init__(self, temperature: float = 0.07, estimator: str = "softmax", num_rows: int = 0,
                 z_momentum: float = 0.0):
        super().__init__()
        if estimator not in ("softmax", "nce"):
            raise ValueError(f"unknown estimator {estimator!r}")
        self.temperature, self.estimator, self.num_rows, self.z_momentum = temperature, estimator, num_rows, z_momentum
        self.register_buffer("Z", torch.full((2,), -1.0))  # one normalising constant per anchor view (o, a)

    def term(self, anchor, positive, negatives, view: int) -> torch.Tensor:
        """One of Eq. 2's two terms, averaged over the batch. anchor, positive: B × d; negatives: B × m × d."""
        pos = (anchor * positive).sum(-1, keepdim=True) / self.temperature
        neg = torch.einsum("bd,bmd->bm", anchor, negatives) / self.temperature
        scores = torch.cat([pos, neg], dim=1)
        if self.estimator == "softmax":
            return -torch.log_softmax(scores, dim=1)[:, 0].mean()
        h = scores.exp()
        with torch.no_grad():
            estimate = h.mean() * self.num_rows
            if self.Z[view] < 0:
                self.Z[view] = estimate
            elif self.z_momentum > 0:
                self.Z[view] = self.z_momentum * self.Z[view] + (1 - self.z_momentum) * estimate
        P = h / self.Z[view]
        m, Pn = negatives.size(1), 1.0 / self.num_rows
        log_pos = torch.log(P[:, 0] / (P[:, 0] + m * Pn))
        log_neg = torch.log(m * Pn / (P[:, 1:] + m * Pn)).sum(1)
        return -(log_pos + log_neg).mean()

    def forward(self, R, R_adv, neg_orig, neg_adv, pos_for_adv=None, pos_for_orig=None):
        """L_D for normalised R, R^adv (B × d) and bank negatives (B × m × d). ``pos_for_*`` override the live
        positives (the CRD option): pos_for_adv is R's stand-in, pos_for_orig R^adv's."""
        loss_a = self.term(R_adv, R if pos_for_adv is None else pos_for_adv, neg_orig, view=1)
        loss_o = self.term(R, R_adv if pos_for_orig is None else pos_for_orig, neg_adv, view=0)
        return loss_o + loss_a, {"loss_D_o": loss_o.item(), "loss_D_a": loss_a.item()}
