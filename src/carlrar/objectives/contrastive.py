"""CARL's contrastive objective (Eq. 2–6) and everything it needs: the memory banks and their momentum update
(Eq. 5), the negatives of other labels, the softmax and NCE estimators, the bank-filling epoch, and the term that a
FreeLB step adds to its last pass.

References: Qiu, Zhang, Zhou, "Improving Gradient-based Adversarial Training for Text Classification by Contrastive
Learning and Auto-Encoder" (ACL Findings 2021, https://arxiv.org/abs/2109.06536), Eq. 2–6 and Table 3; the memory
bank and NCE as in CRD (Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020,
https://arxiv.org/abs/1910.10699, github.com/HobbitLong/RepDistiller ``crd/memory.py``, ``crd/criterion.py``).

(One file of ~390 lines, a third of them docstrings, on purpose: all of CARL's machinery in one place, as MoCo's
builder and CRD's memory keep the bank next to the loss it feeds.)
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from carlrar.config import Limits, check, config_field as _f
from carlrar.distributed import all_mean, gather_rows, global_batch_order, rank, world_size
from carlrar.objectives.term import NOTHING, ObjectiveTerm, TermLoss, balanced_weight

CITATION = """@inproceedings{qiu2021carl,
  title = {Improving Gradient-based Adversarial Training for Text Classification by Contrastive Learning and
           Auto-Encoder},
  author = {Qiu, Yao and Zhang, Jinchao and Zhou, Jie},
  booktitle = {Findings of the Association for Computational Linguistics: ACL-IJCNLP 2021},
  year = {2021}
}"""


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

    @classmethod
    def from_spec(cls, spec: dict, model) -> Projection:
        return cls(spec["in_features"], spec["out_features"])


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

    References: the paper's Eq. 2–4 (https://arxiv.org/abs/2109.06536); NCE with a memory bank: Wu et al. 2018
    (https://arxiv.org/abs/1805.01978), CRD (https://arxiv.org/abs/1910.10699). ``CITATION`` holds the BibTeX.

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
        rows (CRD); without, the live R / R^adv (Eq. 2). Always in float32, also under --mixed_precision: with
        τ = 0.07 a bf16 dot product's error (~0.004) would move each score by ~0.06."""
        with torch.autocast(R.device.type, enabled=False):
            return self.scores_and_loss(R.float(), R_adv.float(), bank_orig, bank_adv, negatives, index)

    def scores_and_loss(self, R, R_adv, bank_orig, bank_adv, negatives, index):
        pos_a = (R_adv * (R if index is None else bank_orig(index))).sum(1)
        pos_o = (R * (R_adv if index is None else bank_adv(index))).sum(1)
        neg_a = bank_scores(R_adv, bank_orig, negatives)
        neg_o = bank_scores(R, bank_adv, negatives)
        loss_a, loss_o = self.term(pos_a, neg_a, view=1), self.term(pos_o, neg_o, view=0)
        return loss_o + loss_a, {"loss_D_o": loss_o.item(), "loss_D_a": loss_a.item(),
                                 "score_pos": pos_a.mean().item() / self.temperature,
                                 "score_neg": neg_a.mean().item() / self.temperature,
                                 # how hard the negatives are: the share scoring above their anchor's positive
                                 "neg_above_pos": (neg_a > pos_a.unsqueeze(1)).float().mean().item()}


@dataclass
class ContrastiveConfig:
    """CARL (Eq. 2–6). Defaults: the paper's (m = 16,000, τ = 0.07, M = 0.5) with a CPU-sized start step."""

    carl_start_step: float = _f(0.5, "first step with L_D; < 1 means that fraction of training (Table 3: SST-2 "
                                     "6315, Yahoo 7200, Yelp-P 5625, AG News 7750); the banks are filled just before")
    carl_negatives: int = _f(16000, "m: negatives per anchor, of other labels (paper: 16,000; Yelp-P 20,000)")
    carl_temperature: float = _f(0.07, "τ in h(x, y) = exp(x·y / τ) (Eq. 4)")
    carl_momentum: float = _f(0.5, "M in the bank update B ← M·B + (1 − M)·R (Eq. 5)")
    carl_weight: float = _f(1.0, "weight of L_D next to L_C (Eq. 6: 1)")
    carl_estimator: str = _f("softmax", "softmax (exact over the sampled set) or nce (the paper's approximation)",
                             choices=["softmax", "nce"])
    carl_positive: str = _f("live", "live: R / R^adv as in Eq. 2; bank: the other view's bank row, as CRD",
                            choices=["live", "bank"])
    carl_z_momentum: float = _f(0.9, "NCE: moving average of Z (0: CRD's Z fixed on the first batch)")
    bank_dtype: str = _f("float32", "memory bank storage: float32 or float16 (2·N·d·bytes in all)",
                         choices=["float32", "float16"])
    carl_proj_dim: int = _f(0, "project R to this size with a linear head before normalising (0: none, as the paper)")
    carl_representation: str = _f("cls", "what L_D contrasts: cls, R = the final [CLS] state (the paper); "
                                         "head_input, what the logits' linear layer reads (BERT, ALBERT: the "
                                         "pooler's tanh output)", choices=["cls", "head_input"])
    # beyond the paper (defaults keep the paper's behaviour)
    carl_weight_ratio: float = _f(0.0, "> 0: w = min(carl_weight, ratio · ‖∇L_C‖ / ‖∇L_D‖), measured on the "
                                       "start step and every --carl_balance_steps after (0: fixed carl_weight)")
    carl_balance_steps: int = _f(25, "steps between two measurements of the balanced weight")
    carl_start_rule: str = _f("step", "step: start at carl_start_step (Table 3); plateau: once the selection "
                                      "accuracy has not improved for --carl_plateau_patience evaluations",
                              choices=["step", "plateau"])
    carl_plateau_patience: int = _f(2, "plateau rule: evaluations without a new best before L_D starts")

    LIMITS: ClassVar[Limits] = Limits(
        minimum={"carl_negatives": 1, "carl_temperature": 1e-6, "carl_start_step": 0, "carl_proj_dim": 0,
                 "carl_weight_ratio": 0, "carl_balance_steps": 1, "carl_plateau_patience": 1, "carl_momentum": 0,
                 "carl_weight": 0, "carl_z_momentum": 0},
        maximum={"carl_momentum": 1, "carl_z_momentum": 1, "carl_proj_dim": 65536})  # a wider head is a mistake

    def __post_init__(self):
        check(self)


class ContrastiveTerm(ObjectiveTerm):
    """CARL's L_D as a term of FreeLB's last pass (Eq. 6: L_C + w·L_D), with its banks, sampler and schedule.

    Plain FreeLB until the start step; then one pass over the training set fills B_orig and B_adv (``before_step``);
    from then on the last FreeLB pass also forwards the clean input (same dropout masks) for R, scores R and R^adv
    against m negatives of other labels from the other view's bank, and once the step's backward is done writes
    both views into the banks (Eq. 5). On several processes every process draws the negatives of the global batch
    and applies every process's rows, so the banks stay identical everywhere.

    Args: ``config`` (ContrastiveConfig), ``adv`` (the FreeLB config: the fill uses its init and ascent steps),
    ``model`` (a Classifier; the optional projection head is added to ``model.heads``), ``train_labels`` (one label
    per training example, by dataset index), ``total_steps`` (resolves a fractional start step), ``seed``.

    Example::

        term = ContrastiveTerm(ContrastiveConfig(carl_start_step=1, carl_negatives=4), AdversarialConfig(), model,
                               train_labels=[0, 1] * 8, total_steps=10)
        freelb_step(model, batch, lambda loss: loss.backward(), AdversarialConfig(), terms=(term,), step=5)
    """

    def __init__(self, config: ContrastiveConfig, adv, model, train_labels=(), total_steps: int = 0, seed: int = 0):
        self.config, self.adv = config, adv
        start = config.carl_start_step
        self.start_step = int(round(start * total_steps)) if 0 < start < 1 else int(start)
        if config.carl_start_rule == "plateau":  # set by after_evaluate once the selection accuracy stalls
            self.start_step, self.plateau = total_steps + 1, [-1.0, 0]  # best accuracy, evaluations since
        elif not 0 < self.start_step < total_steps:
            warnings.warn(f"CARL: start step {self.start_step} is outside 1..{total_steps - 1}: "
                          f"{'L_D starts before any FreeLB step' if self.start_step <= 0 else 'L_D never applies'}",
                          stacklevel=2)
        device, n, dim = model.device, len(train_labels), model.config.hidden_size
        if config.carl_representation == "head_input":  # ours: the margin diagnostic's cause (README)
            dim = model.read_head_input()
        if config.carl_proj_dim > 0:  # a model head, so the optimiser, checkpoints and saving all see it
            model.heads["carl_projection"] = Projection(dim, config.carl_proj_dim).to(device)
            dim = config.carl_proj_dim
        dtype = {"float32": torch.float32, "float16": torch.float16}[config.bank_dtype]
        self.bank_orig = MemoryBank(n, dim, config.carl_momentum, dtype).to(device)
        self.bank_adv = MemoryBank(n, dim, config.carl_momentum, dtype).to(device)
        self.sampler = NegativeSampler(list(train_labels), config.carl_negatives)
        self.loss = ContrastiveLoss(config.carl_temperature, config.carl_estimator, n, config.carl_z_momentum).to(device)
        self.filled, self.weight, self.balanced_at = False, config.carl_weight, None
        # negatives come from a generator re-seeded each step: the same draws on every process and after a resume
        self.seed, self.generator, self.step = seed, torch.Generator(), None

    @property
    def select_after_step(self) -> int:
        return self.start_step  # best checkpoints only once L_D has trained the model

    @classmethod
    def from_run(cls, configs, model, train_labels, total_steps, train_config):
        from carlrar.methods.adversarial import AdversarialConfig

        return cls(configs[ContrastiveConfig], configs[AdversarialConfig], model, train_labels, total_steps,
                   getattr(train_config, "seed", 0))

    @property
    def extra_passes(self) -> int:
        return 1 if self.filled else 0  # the clean pass that gives R

    def represent(self, model, out) -> torch.Tensor:
        """R (or the head's input; or either's projection) on the unit sphere, where the banks and h(x, y) live."""
        R = out.head_input if self.config.carl_representation == "head_input" else out.R
        heads = model.heads
        return F.normalize(heads["carl_projection"](R) if "carl_projection" in heads else R, dim=1)

    def before_step(self, step, model, data, collate, batch_size) -> bool:
        """At the start step, fill both banks once (forward only, no parameter update). True when it did."""
        if self.filled or step < self.start_step:
            return False
        was_training = model.training
        model.eval()  # fixed representations to start from: no dropout
        index, R, R_adv = gather_rows(*self.fill_rows(model, data, collate, batch_size))  # every process: all rows
        self.bank_orig.fill(index, R)
        self.bank_adv.fill(index, R_adv)
        model.train(was_training)
        self.filled = True
        return True

    def fill_rows(self, model, data, collate, batch_size) -> list[torch.Tensor]:
        """(index, R, R^adv) of this process's share of the training set; R^adv as training makes it: FreeLB's
        init and its n − 1 ascent steps."""
        from tqdm.auto import tqdm

        from carlrar.attack import pgd_attack
        from carlrar.data import eval_batches

        c, device = self.adv, model.device
        batches = eval_batches(data.lengths, batch_size)[rank()::world_size()]  # each process fills a share
        rows = []
        for idx in tqdm(batches, desc="CARL bank fill", disable=not sys.stderr.isatty(), leave=False):
            b = {k: v.to(device) for k, v in collate([data[i] for i in idx]).items()}
            ids, mask = b["input_ids"], b["attention_mask"]
            with torch.no_grad():
                clean = model(ids, mask)
            delta = pgd_attack(model, ids, mask, b["labels"], c.adv_max_norm, c.adv_steps - 1, c.adv_lr, c.adv_norm,
                               c.adv_init_mag)
            with torch.no_grad():
                adv = model(ids, mask, delta=delta)
                rows.append((b["index"], self.represent(model, clean), self.represent(model, adv)))
        if rows:
            return [torch.cat(p) for p in zip(*rows)]
        dim = self.bank_orig.rows.shape[1]
        return [torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dim, device=device),
                torch.empty(0, dim, device=device)]

    def begin(self, batch, step):
        if step != self.step:
            self.generator.manual_seed(self.seed * 1_000_003 + step)
            self.step = step

    def pass_loss(self, model, batch, out, t, n, replay, loss_C) -> TermLoss:
        """w·L_D on the last pass (Eq. 6), R from a clean forward with this pass's dropout masks."""
        if not self.filled or t < n - 1:
            return NOTHING
        with replay.same_masks():
            R = self.represent(model, model(batch["input_ids"], batch["attention_mask"]))  # original input
        R_adv = self.represent(model, out)
        index = batch["index"]
        # drawn for the global batch in its order and sliced: as one process would draw them
        (labels,), (order, mine) = gather_rows(batch["labels"]), global_batch_order(len(index))
        negatives = self.sampler.sample(labels.cpu()[order], self.generator)[mine].to(R.device)
        loss, logs = self.loss(R, R_adv, self.bank_orig, self.bank_adv, negatives,
                               index=index if self.config.carl_positive == "bank" else None)
        logs.update(loss_D=loss.item(), cos_R_Radv=(R * R_adv).sum(1).mean().item())
        c = self.config
        if c.carl_weight_ratio > 0 and self.balanced_at != self.step \
                and (self.step - self.start_step) % c.carl_balance_steps == 0:
            self.weight, self.balanced_at = balanced_weight(model, loss_C, loss, c.carl_weight_ratio, c.carl_weight), self.step
        if c.carl_weight_ratio > 0:
            logs["carl_weight"] = self.weight
        rows = (index, R.detach(), R_adv.detach())  # written after the backward, which still reads the old rows
        return TermLoss(self.weight * loss, logs, lambda: self.update_banks(*rows), {"D": loss}, weight=self.weight)

    def update_banks(self, index, R, R_adv):
        """Eq. 5 with every process's rows, so all banks stay identical."""
        index, R, R_adv = gather_rows(index, R, R_adv)
        finite = R.isfinite().all(1) & R_adv.isfinite().all(1)  # a NaN row would poison every later step
        self.bank_orig.update(index[finite], R[finite])
        self.bank_adv.update(index[finite], R_adv[finite])

    def after_evaluate(self, step, accuracy):
        """Plateau rule: L_D starts (banks filled before the next step) after ``carl_plateau_patience``
        evaluations without a new best selection accuracy."""
        if self.config.carl_start_rule != "plateau" or self.start_step <= step:
            return
        best, since = self.plateau
        self.plateau = [accuracy, 0] if accuracy > best else [best, since + 1]
        if self.plateau[1] >= self.config.carl_plateau_patience:
            self.start_step = step

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The banks, NCE's Z, whether the banks are filled, the start step and the balanced weight."""
        state = {"bank_orig": self.bank_orig.rows, "bank_adv": self.bank_adv.rows, "Z": self.loss.Z,
                 "filled": torch.tensor(int(self.filled))}
        if self.config.carl_start_rule == "plateau":
            state.update(start_step=torch.tensor(self.start_step),
                         plateau=torch.tensor(self.plateau, dtype=torch.float64))  # exact accuracies on resume
        if self.config.carl_weight_ratio > 0:
            state["weight"] = torch.tensor(self.weight, dtype=torch.float64)
        return state

    def load_state_tensors(self, state):
        self.bank_orig.rows.copy_(state["bank_orig"])
        self.bank_adv.rows.copy_(state["bank_adv"])
        self.loss.Z.copy_(state["Z"])
        self.filled = bool(state["filled"].item())
        if "start_step" in state:
            best, since = state["plateau"].tolist()
            self.start_step, self.plateau = int(state["start_step"]), [best, int(since)]
        if "weight" in state:
            self.weight = float(state["weight"])
