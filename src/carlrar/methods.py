"""Training methods: a config dataclass (its fields are CLI flags) and a ``training_step`` each, in a registry.

A method's config dataclasses are listed in ``config_classes``; its
``training_step(model, batch, backward, scale, step)`` runs its forward/backward passes for one
micro-batch and returns scalars to log. ``scale`` is 1 / gradient-accumulation steps; ``backward`` is the
accelerator's; ``step`` is the optimiser step about to be taken. The loop in ``train.py`` owns everything else.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from carlrar.config import check
from carlrar.distributed import gather_rows, global_batch_order, rank, world_size
from carlrar.perturb import ascent_step, init_delta


def _f(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class AdversarialConfig:
    """δ on the word embeddings (Eq. 1). Defaults: the paper's SST-2 FreeLB setting (Table 1)."""

    adv_init_mag: float = _f(0.6, "γ: magnitude of δ's random init (0: zero init)")
    adv_lr: float = _f(0.1, "α: ascent step size on δ (FGM: the single step's size)")
    adv_max_norm: float = _f(0.0, "ε: project δ onto ‖δ‖ ≤ ε per example (0: unbounded)")
    adv_steps: int = _f(2, "n: FreeLB passes / k: PGD ascent steps")
    adv_norm: str = _f("l2", "norm for init, step and projection: l2 or linf", choices=["l2", "linf"])
    adv_start_step: int = _f(0, "plain training before this optimiser step (guards against early NaNs)")
    adv_reuse_dropout: bool = _f(True, "same dropout masks in all FreeLB passes of a batch, as the official code")
    pgd_clean: bool = _f(False, "PGD: train on (L_C(clean) + L_C(adversarial)) / 2 instead of the adversarial only")

    def __post_init__(self):
        check(self, minimum={"adv_steps": 1, "adv_init_mag": 0, "adv_lr": 0, "adv_max_norm": 0, "adv_start_step": 0})


def _inner(model):
    """The module under a DistributedDataParallel wrapper (ascent passes need no gradient sync)."""
    return getattr(model, "module", model)


class Base:
    """Plain fine-tuning: cross-entropy on the clean input (L_C, Eq. 8)."""

    config_classes: tuple[type, ...] = ()  # the dataclasses holding this method's knobs, in __init__'s order

    def __init__(self, *configs, **_):
        self.config = configs[0] if configs else None

    @property
    def passes(self) -> float:
        """Forward+backward passes per example, for the throughput line."""
        return 1

    def training_step(self, model, batch, backward, scale: float = 1.0, step: int = 0) -> dict[str, float]:
        out = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(out.logits, batch["labels"])
        backward(loss * scale)
        return {"loss": loss.item()}


class FreeLB(Base):
    """FreeLB (Zhu et al. 2020) as the official HF example: n passes on E + δ, parameter gradients of every pass
    accumulate with weight 1/n, δ takes a normalised ascent step between passes (none after the last)."""

    config_classes = (AdversarialConfig,)

    @property
    def passes(self):
        return self.config.adv_steps

    def delta0(self, model, batch) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        dim = _inner(model).word_embeddings.embedding_dim
        return init_delta(torch.empty(*ids.shape, dim), mask, self.config.adv_init_mag, self.config.adv_norm)

    def training_step(self, model, batch, backward, scale=1.0, step=0):
        c = self.config
        if step < c.adv_start_step:
            return super().training_step(model, batch, backward, scale, step)
        mask, labels = batch["attention_mask"], batch["labels"]
        delta = self.delta0(model, batch)
        self.rng = torch.get_rng_state()
        logs: dict[str, float] = {"loss": 0.0}
        for t in range(c.adv_steps):
            if c.adv_reuse_dropout:
                torch.set_rng_state(self.rng)  # identical ops and shapes → identical dropout masks in every pass
            delta.requires_grad_()
            out = model(batch["input_ids"], mask, delta=delta)  # embeddings recomputed from ids each pass
            loss = F.cross_entropy(out.logits, labels)
            extra, extra_logs = self.pass_objective(model, batch, out, t)
            backward((loss / c.adv_steps + extra) * scale)
            logs["loss"] += loss.item() / c.adv_steps
            for k, v in extra_logs.items():
                logs[k] = logs.get(k, 0.0) + v
            if t < c.adv_steps - 1:
                delta = ascent_step(delta, delta.grad, mask, c.adv_lr, c.adv_max_norm, c.adv_norm)
        return logs

    def pass_objective(self, model, batch, out, t: int):
        """Extra loss added to pass t's L_C / n before its backward, and scalars to log. FreeLB: none."""
        return 0.0, {}


class PGD(FreeLB):
    """PGD adversarial training (Madry et al. 2018): k ascent steps on δ with parameter gradients discarded, then
    one training pass on the final δ (optionally averaged with the clean loss)."""

    @property
    def passes(self):
        return self.config.adv_steps + 1 + self.config.pgd_clean

    def training_step(self, model, batch, backward, scale=1.0, step=0):
        c = self.config
        if step < c.adv_start_step:
            return Base.training_step(self, model, batch, backward, scale, step)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        delta = self.delta0(model, batch)
        for _ in range(c.adv_steps):
            delta.requires_grad_()
            loss = F.cross_entropy(_inner(model)(ids, mask, delta=delta).logits, labels)
            (grad,) = torch.autograd.grad(loss, delta)  # only δ's gradient: parameters untouched
            delta = ascent_step(delta, grad, mask, c.adv_lr, c.adv_max_norm, c.adv_norm)
        loss = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
        logs = {"loss_adv": loss.item()}
        if c.pgd_clean:
            clean = F.cross_entropy(model(ids, mask).logits, labels)
            logs["loss_clean"] = clean.item()
            loss = (loss + clean) / 2
        backward(loss * scale)
        return {"loss": loss.item(), **logs}


class FGM(FreeLB):
    """FGM adversarial training (Miyato et al. 2017): clean pass, one normalised step of size α from δ = 0, then an
    adversarial pass; L_C(clean) + L_C(adversarial)."""

    @property
    def passes(self):
        return 2

    def training_step(self, model, batch, backward, scale=1.0, step=0):
        c = self.config
        if step < c.adv_start_step:
            return Base.training_step(self, model, batch, backward, scale, step)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        dim = _inner(model).word_embeddings.embedding_dim
        delta = torch.zeros(*ids.shape, dim, requires_grad=True)
        clean = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
        backward(clean * scale)
        delta = ascent_step(delta, delta.grad, mask, c.adv_lr, c.adv_max_norm, c.adv_norm)
        adv = F.cross_entropy(model(ids, mask, delta=delta).logits, labels)
        backward(adv * scale)
        return {"loss": clean.item() + adv.item(), "loss_clean": clean.item(), "loss_adv": adv.item()}


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

    def __post_init__(self):
        check(self, minimum={"carl_negatives": 1, "carl_temperature": 1e-6, "carl_start_step": 0, "carl_proj_dim": 0})


class CARL(FreeLB):
    """CARL: FreeLB plus a contrastive loss between the original and adversarial [CLS] representations with
    negatives of other labels from two momentum memory banks (Eq. 2–6). L_C only until the start step; then one
    pass over the training set fills B_orig and B_adv; then L_C + w·L_D every step."""

    config_classes = (AdversarialConfig, ContrastiveConfig)

    def __init__(self, adv: AdversarialConfig, carl: ContrastiveConfig, model=None, train_labels=(),
                 total_steps: int = 0, train_config=None, **_):
        FreeLB.__init__(self, adv)  # explicit: CARLRAR combines CARL and RAR
        from carlrar.objectives import ContrastiveLoss, MemoryBank, NegativeSampler, Projection

        self.carl = carl
        start = carl.carl_start_step
        self.start_step = int(round(start * total_steps)) if 0 < start < 1 else int(start)
        self.select_after_step = self.start_step  # best-dev checkpoints only once L_D has trained the model
        if not 0 < self.start_step < total_steps:
            warnings.warn(f"CARL: start step {self.start_step} is outside 1..{total_steps - 1}: "
                          f"{'L_D starts before any FreeLB step' if self.start_step <= 0 else 'L_D never applies'}",
                          stacklevel=2)
        n, dim = len(train_labels), _inner(model).config.hidden_size
        if carl.carl_proj_dim > 0:  # a model head, so the optimiser, checkpoints and saving all see it
            _inner(model).heads["carl_projection"] = Projection(dim, carl.carl_proj_dim)
            dim = carl.carl_proj_dim
        dtype = {"float32": torch.float32, "float16": torch.float16}[carl.bank_dtype]
        self.bank_orig = MemoryBank(n, dim, carl.carl_momentum, dtype)
        self.bank_adv = MemoryBank(n, dim, carl.carl_momentum, dtype)
        self.sampler = NegativeSampler(list(train_labels), carl.carl_negatives)
        self.loss = ContrastiveLoss(carl.carl_temperature, carl.carl_estimator, n, carl.carl_z_momentum)
        self.filled = False
        # negatives come from a generator re-seeded each step: the same draws on every process and after a resume
        self.seed, self.generator, self.step = getattr(train_config, "seed", 0), torch.Generator(), None

    @property
    def passes(self):
        return self.config.adv_steps + (1 if self.filled else 0)  # + the clean pass that gives R

    @staticmethod
    def represent(model, R: torch.Tensor) -> torch.Tensor:
        """R (or its projection) on the unit sphere, where the banks and h(x, y) live."""
        heads = _inner(model).heads
        return F.normalize(heads["carl_projection"](R) if "carl_projection" in heads else R, dim=1)

    def before_step(self, step: int, model, data, collate, batch_size: int) -> bool:
        """At the start step, fill both banks once (forward only, no parameter update). True when it did."""
        if self.filled or step < self.start_step:
            return False
        from tqdm.auto import tqdm

        from carlrar.attack import pgd_attack
        from carlrar.data import eval_batches

        inner, c = _inner(model), self.config
        was_training = inner.training
        inner.eval()  # fixed representations to start from: no dropout
        batches = eval_batches(data.lengths, batch_size)[rank()::world_size()]  # each process fills a share
        rows = []
        for idx in tqdm(batches, desc="CARL bank fill", disable=not sys.stderr.isatty(), leave=False):
            b = collate([data[i] for i in idx])
            ids, mask = b["input_ids"], b["attention_mask"]
            with torch.no_grad():
                R = inner(ids, mask).R
            # R^adv as training makes it: FreeLB's init and its n − 1 ascent steps
            delta = pgd_attack(inner, ids, mask, b["labels"], c.adv_max_norm, c.adv_steps - 1, c.adv_lr, c.adv_norm,
                               c.adv_init_mag)
            with torch.no_grad():
                R_adv = inner(ids, mask, delta=delta).R
                rows.append((b["index"], self.represent(inner, R), self.represent(inner, R_adv)))
        dim = self.bank_orig.rows.shape[1]
        local = [torch.cat(p) for p in zip(*rows)] if rows else [torch.empty(0, dtype=torch.long),
                                                                 torch.empty(0, dim), torch.empty(0, dim)]
        index, R, R_adv = gather_rows(*local)  # every process: all rows
        self.bank_orig.fill(index, R)
        self.bank_adv.fill(index, R_adv)
        inner.train(was_training)
        self.filled = True
        return True

    def pass_objective(self, model, batch, out, t):
        if not self.filled or t < self.config.adv_steps - 1:
            return 0.0, {}
        if self.config.adv_reuse_dropout:
            torch.set_rng_state(self.rng)
        R = self.represent(model, _inner(model)(batch["input_ids"], batch["attention_mask"]).R)  # original input
        R_adv = self.represent(model, out.R)
        index = batch["index"]
        # drawn for the global batch in its order and sliced: as one process would draw them
        (labels,), (order, mine) = gather_rows(batch["labels"]), global_batch_order(len(index))
        negatives = self.sampler.sample(labels[order], self.generator)[mine]
        loss, logs = self.loss(R, R_adv, self.bank_orig, self.bank_adv, negatives,
                               index=index if self.carl.carl_positive == "bank" else None)
        logs.update(loss_D=loss.item(), cos_R_Radv=(R * R_adv).sum(1).mean().item())
        self.pending = (index, R.detach(), R_adv.detach())  # applied after the backward, which still reads the rows
        return self.carl.carl_weight * loss, logs

    def training_step(self, model, batch, backward, scale=1.0, step=0):
        if step != self.step:
            self.generator.manual_seed(self.seed * 1_000_003 + step)
            self.step = step
        self.pending = None
        logs = super().training_step(model, batch, backward, scale, step)
        if self.pending is not None:  # Eq. 5 with every process's rows, so all banks stay identical
            index, R, R_adv = gather_rows(*self.pending)
            finite = R.isfinite().all(1) & R_adv.isfinite().all(1)  # a NaN row would poison every later step
            self.bank_orig.update(index[finite], R[finite])
            self.bank_adv.update(index[finite], R_adv[finite])
        return logs

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold beyond the model: the banks, NCE's Z and whether the banks are filled."""
        return {"bank_orig": self.bank_orig.rows, "bank_adv": self.bank_adv.rows, "Z": self.loss.Z,
                "filled": torch.tensor(int(self.filled))}

    def load_state_tensors(self, state: dict[str, torch.Tensor]):
        self.bank_orig.rows.copy_(state["bank_orig"])
        self.bank_adv.rows.copy_(state["bank_adv"])
        self.loss.Z.copy_(state["Z"])
        self.filled = bool(state["filled"].item())


@dataclass
class ReconstructionConfig:
    """RAR (Eq. 7)."""

    rar_weight: float = _f(0.1, "w_r: weight of L_R next to L_C on every adversarial pass (Eq. 7: 0.1)")
    rar_passes: str = _f("all", "all: L_R on every FreeLB pass (paper); last: only on the last pass (cheaper)",
                         choices=["all", "last"])

    def __post_init__(self):
        check(self, minimum={"rar_weight": 0})


def _pretrained_tensors(name: str) -> dict:
    """The encoder checkpoint's tensors (to find an MLM head), or {} when there is no local safetensors file."""
    from pathlib import Path

    from safetensors.torch import load_file

    from carlrar.models import resolve

    files = sorted(Path(resolve(name)).glob("*.safetensors")) if Path(resolve(name)).is_dir() else []
    return {k: v for f in files for k, v in load_file(str(f)).items()}


class RAR(FreeLB):
    """RAR: FreeLB whose every adversarial pass also reconstructs the original tokens from its token states
    through a head tied to the word embeddings; pass loss L_C + w_r·L_R (Eq. 7), from the first step."""

    config_classes = (AdversarialConfig, ReconstructionConfig)

    def __init__(self, adv: AdversarialConfig, rar: ReconstructionConfig, model=None, train_config=None, **_):
        FreeLB.__init__(self, adv)  # explicit: CARLRAR combines CARL and RAR
        from carlrar.objectives.reconstruction import load_mlm_head

        self.rar = rar
        self.head = _inner(model).add_reconstructor()
        name = getattr(train_config, "model", None)
        self.head_from_mlm = bool(name) and load_mlm_head(self.head, _pretrained_tensors(name))

    def pass_objective(self, model, batch, out, t):
        from carlrar.objectives.reconstruction import reconstruction_loss

        if self.rar.rar_passes == "last" and t < self.config.adv_steps - 1:
            return 0.0, {}
        logits = _inner(model).heads["reconstructor"](out.token_states)
        loss = reconstruction_loss(logits, batch["input_ids"], batch["attention_mask"])
        n = self.config.adv_steps if self.rar.rar_passes == "all" else 1  # same total weight either way
        return self.rar.rar_weight * loss / n, {"loss_R": loss.item() / n}


class CARLRAR(CARL, RAR):
    """CARL and RAR together: L_C + w_r·L_R on every adversarial pass, + L_D on the last (not in the paper)."""

    config_classes = (AdversarialConfig, ContrastiveConfig, ReconstructionConfig)

    def __init__(self, adv, carl, rar, **kw):
        CARL.__init__(self, adv, carl, **kw)
        RAR.__init__(self, adv, rar, **kw)

    def pass_objective(self, model, batch, out, t):
        carl_loss, carl_logs = CARL.pass_objective(self, model, batch, out, t)
        rar_loss, rar_logs = RAR.pass_objective(self, model, batch, out, t)
        return carl_loss + rar_loss, {**carl_logs, **rar_logs}


METHODS: dict[str, type] = {"base": Base, "freelb": FreeLB, "pgd": PGD, "fgm": FGM, "carl": CARL, "rar": RAR,
                            "carl-rar": CARLRAR}


def config_classes() -> tuple[type, ...]:
    """Every registered method's config dataclasses, each once (methods share them)."""
    return tuple(dict.fromkeys(c for m in METHODS.values() for c in m.config_classes))
