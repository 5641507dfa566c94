"""CARL's contrastive objective (Eq. 2–5): memory banks, negatives of other labels, softmax and NCE estimators."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from carlrar.distributed import all_mean


class MemoryBank(nn.Module):
    """One L2-normalised row per training example (by dataset index), updated with momentum (Eq. 5).

    ``update``: B[i] ← normalize(M·B[i] + (1 − M)·R_i), normalised after the mix as in CRD (Tian et al.), so rows
    stay on the unit sphere that the scores h(x, y) = exp(x·y / τ) assume. ``fill`` writes rows outright (the
    paper's bank-filling epoch), which overwrites every row before any is read, so rows start at zero (CRD's
    random init would only consume RNG draws). Storage is N × d × bytes(dtype): fp16 halves it for large N;
    scores are computed in fp32.

    Example::

        bank = MemoryBank(num_rows=5, dim=4, momentum=0.5)
        bank.update(torch.tensor([2]), F.normalize(torch.ones(1, 4), dim=1))
        bank(torch.tensor([[2, 3]])).shape  # (1, 2, 4)
    """

    def __init__(self, num_rows: int, dim: int, momentum: float = 0.5, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("rows", torch.zeros(num_rows, dim, dtype=dtype))

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
    pool (with a warning). Draws use the given generator (CARL seeds one per step), else torch's global RNG.
    """

    def __init__(self, labels: list[int], m: int):
        labels = torch.as_tensor(labels)
        self.pools = {c: torch.nonzero(labels != c).squeeze(1) for c in labels.unique().tolist()}
        smallest = min(len(p) for p in self.pools.values())
        if m > smallest:
            warnings.warn(f"CARL: {m} negatives requested but only {smallest} examples of other labels exist "
                          f"for some label; using m = {smallest}", stacklevel=2)
        self.m = min(m, smallest)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = torch.empty(len(labels), self.m, dtype=torch.long)
        for c in labels.unique().tolist():
            rows = labels == c
            pool = self.pools[c]
            out[rows] = pool[torch.randint(len(pool), (int(rows.sum()), self.m), generator=generator)]
        return out


class Projection(nn.Linear):
    """Optional head between R and the contrastive space (CRD's embed layer): a linear map hidden → dim. The paper
    uses none (default); the banks then hold the normalised R itself."""

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}


def bank_scores(anchor: torch.Tensor, bank: MemoryBank, index: torch.Tensor) -> torch.Tensor:
    """anchor · bank[index[b, j]] for every row b (B × m), without building a B × m × d tensor: score each distinct
    drawn row once and pick. When the batch draws at least N ids (SST-2: 32 × 16,000 vs 67,349 rows) nearly every
    row is hit, and one matmul over the whole bank is cheaper than gathering the rows first."""
    if index.numel() >= len(bank.rows):
        return (anchor @ bank.rows.float().T).gather(1, index)
    unique, where = torch.unique(index, return_inverse=True)
    return (anchor @ bank(unique).T).gather(1, where)


class ContrastiveLoss(nn.Module):
    """L_D = L_D^o + L_D^a (Eq. 2–3) with h(x, y) = exp(x·y / τ) (Eq. 4) on L2-normalised representations.

    - L_D^a: anchor R^adv, positive R, negatives from B_orig.  L_D^o: anchor R, positive R^adv, negatives from
      B_adv. ``positive="live"`` uses the live R / R^adv as Eq. 2 does (gradient flows through both);
      ``positive="bank"`` uses the other view's bank row of the same example, as CRD does.
    - ``estimator="softmax"``: −log h⁺ / (h⁺ + Σ_j h⁻_j), exact over the sampled set (InfoNCE). We keep the positive
      in the denominator, as InfoNCE and CRD do; without it the loss has no lower bound.
    - ``estimator="nce"``: the NCE approximation the paper cites (Wu et al. 2018; Tian et al. CRD): P = h / Z,
      noise prior Pn = 1/N as in CRD (our negatives are uniform over the other labels' pool, so the exact prior is
      1/|pool|, about 2/N on two balanced classes), loss −[log P⁺/(P⁺ + m·Pn) + Σ_j log m·Pn/(P⁻_j + m·Pn)]. Z is set on the first call to
      N·mean(h) (CRD) and, with ``z_momentum`` > 0, follows an exponential moving average of that (better
      behaved than CRD's fixed first-batch Z).

    Inputs: R, R^adv (B × d, normalised), the two banks and ``negatives`` (B × m dataset indices). Gradients reach
    R and R^adv only; bank rows are buffers.

    Relations: InfoNCE / CPC (softmax), CRD (nce, bank positives); sentence-transformers'
    MultipleNegativesRankingLoss is the softmax estimator with in-batch negatives instead of a memory bank.

    Example::

        banks = MemoryBank(100, 4), MemoryBank(100, 4)
        r, r_adv = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
        value, logs = ContrastiveLoss(temperature=0.07)(r, r_adv, *banks, torch.randint(100, (2, 16)))
    """

    def __init__(self, temperature: float = 0.07, estimator: str = "softmax", num_rows: int = 0,
                 z_momentum: float = 0.0):
        super().__init__()
        if estimator not in ("softmax", "nce"):
            raise ValueError(f"unknown estimator {estimator!r}")
        self.temperature, self.estimator, self.num_rows, self.z_momentum = temperature, estimator, num_rows, z_momentum
        self.register_buffer("Z", torch.full((2,), -1.0))  # one normalising constant per anchor view (o, a)

    def term(self, pos: torch.Tensor, neg: torch.Tensor, view: int) -> torch.Tensor:
        """One of Eq. 2's two terms from dot products: pos (B), neg (B × m); averaged over the batch."""
        scores = torch.cat([pos.unsqueeze(1), neg], dim=1) / self.temperature
        if self.estimator == "softmax":
            return -torch.log_softmax(scores, dim=1)[:, 0].mean()
        h = scores.exp()
        with torch.no_grad():
            estimate = all_mean(h.mean()) * self.num_rows  # the same Z on every process
            if not torch.isfinite(estimate):
                pass  # a non-finite batch must not poison Z for good
            elif self.Z[view] < 0:
                self.Z[view] = estimate
            elif self.z_momentum > 0:
                self.Z[view] = self.z_momentum * self.Z[view] + (1 - self.z_momentum) * estimate
        P = h / self.Z[view].clone()  # Z is updated in place by the next call; backward needs this value
        m, Pn = neg.size(1), 1.0 / self.num_rows
        log_pos = torch.log(P[:, 0] / (P[:, 0] + m * Pn))
        log_neg = torch.log(m * Pn / (P[:, 1:] + m * Pn)).sum(1)
        return -(log_pos + log_neg).mean()

    def forward(self, R, R_adv, bank_orig: MemoryBank, bank_adv: MemoryBank, negatives: torch.Tensor,
                index: torch.Tensor | None = None):
        """L_D and its parts. With ``index`` (the batch's dataset indices) the positives are the other view's bank
        rows (CRD); without, the live R / R^adv (Eq. 2)."""
        pos_a = (R_adv * (R if index is None else bank_orig(index))).sum(1)
        pos_o = (R * (R_adv if index is None else bank_adv(index))).sum(1)
        neg_a = bank_scores(R_adv, bank_orig, negatives)
        neg_o = bank_scores(R, bank_adv, negatives)
        loss_a, loss_o = self.term(pos_a, neg_a, view=1), self.term(pos_o, neg_o, view=0)
        return loss_o + loss_a, {"loss_D_o": loss_o.item(), "loss_D_a": loss_a.item(),
                                 "score_pos": pos_a.mean().item() / self.temperature,
                                 "score_neg": neg_a.mean().item() / self.temperature}
