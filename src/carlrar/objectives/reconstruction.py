"""RAR's objective (Eq. 7): rebuild the original tokens from adversarial token states through a head tied to the
word embeddings, on every FreeLB pass: L_C + w_r·L_R.

References: Qiu, Zhang, Zhou, "Improving Gradient-based Adversarial Training for Text Classification by Contrastive
Learning and Auto-Encoder" (ACL Findings 2021, https://arxiv.org/abs/2109.06536), Eq. 7, Tables 6–7; the head is the
shape of BERT's / ALBERT's MLM head (Devlin et al. 2019, https://arxiv.org/abs/1810.04805); FreeLB's passes: Zhu et
al. 2020 (https://arxiv.org/abs/1909.11764).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from carlrar.config import Limits, check, config_field as _f
from carlrar.objectives.term import NOTHING, ObjectiveTerm, TermLoss, balanced_weight


class Reconstructor(nn.Module):
    """Token states → dense (hidden → embedding size) → GELU → LayerNorm → decoder tied to the word embeddings.

    The decoder's weight *is* the encoder's word-embedding matrix (vocab × embedding size) and its bias is this
    head's one vocab-sized bias, so the head adds hidden·e + e (dense) + 2e (LayerNorm) + vocab parameters: for
    albert-base-v2, 98,432 + 256 + 30,000 = 128,688, giving the paper's 11,813,810 (Table 7). This is the shape of
    an MLM head (BERT's ``cls.predictions``, ALBERT's ``predictions``), from which it is initialised when the
    checkpoint has one (``load_mlm_head``).

    Example::

        emb = nn.Embedding(100, 8)
        head = Reconstructor(hidden_size=16, word_embeddings=emb)
        head(torch.randn(2, 5, 16)).shape  # (2, 5, 100)
    """

    def __init__(self, hidden_size: int, word_embeddings: nn.Embedding, layer_norm_eps: float = 1e-12,
                 activation: str = "gelu"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.activation = activation  # the encoder's (ALBERT: gelu_new), as its own MLM head uses
        self.act = ACT2FN[activation]
        vocab, embedding_size = word_embeddings.weight.shape
        self.dense = nn.Linear(hidden_size, embedding_size)
        self.layer_norm = nn.LayerNorm(embedding_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self._tied = [word_embeddings]  # a reference, not a submodule: the matrix is counted and saved once

    def spec(self) -> dict:
        return {"hidden_size": self.dense.in_features, "embedding_size": self.dense.out_features,
                "vocab_size": self.bias.numel(), "activation": self.activation}

    @classmethod
    def from_spec(cls, spec: dict, model) -> Reconstructor:
        """Rebuilt for a saved model (``models.load_trained``), tied to that model's word embeddings."""
        return cls(spec["hidden_size"], model.word_embeddings, getattr(model.config, "layer_norm_eps", 1e-12),
                   spec.get("activation", "gelu"))

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self._tied[0].weight

    def forward(self, token_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (batch × len × vocab)."""
        h = self.layer_norm(self.act(self.dense(token_states)))
        return F.linear(h, self.decoder_weight, self.bias)


def attach_reconstructor(model) -> Reconstructor:
    """RAR's reconstructor in ``model.heads`` (created once, tied to the word embeddings, with the encoder's
    activation and LayerNorm epsilon); returns it."""
    if "reconstructor" not in model.heads:
        config = model.config
        act = config.hidden_act if isinstance(config.hidden_act, str) else "gelu"
        model.heads["reconstructor"] = Reconstructor(config.hidden_size, model.word_embeddings,
                                                     getattr(config, "layer_norm_eps", 1e-12), act).to(model.device)
    return model.heads["reconstructor"]


def reconstruction_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L_R (Eq. 7): cross-entropy against the original ids, averaged over real (non-pad) positions. Special tokens
    ([CLS], [SEP]) are real positions and count, like any other token.

    Example::

        reconstruction_loss(torch.zeros(1, 3, 10), torch.tensor([[2, 5, 3]]), torch.tensor([[1, 1, 0]]))  # log 10
    """
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


# (our name, BERT checkpoint key, ALBERT checkpoint key) of an MLM head's tensors
MLM_KEYS = (("dense.weight", "cls.predictions.transform.dense.weight", "predictions.dense.weight"),
            ("dense.bias", "cls.predictions.transform.dense.bias", "predictions.dense.bias"),
            ("layer_norm.weight", "cls.predictions.transform.LayerNorm.weight", "predictions.LayerNorm.weight"),
            ("layer_norm.bias", "cls.predictions.transform.LayerNorm.bias", "predictions.LayerNorm.bias"),
            ("bias", "cls.predictions.bias", "predictions.bias"))


def load_mlm_head(head: Reconstructor, checkpoint: dict[str, torch.Tensor]) -> bool:
    """Copy a pretrained MLM head (BERT or ALBERT key names) into ``head``; False when the checkpoint has none."""
    for keys in (tuple(k[1] for k in MLM_KEYS), tuple(k[2] for k in MLM_KEYS)):
        if all(k in checkpoint for k in keys):
            state = {ours: checkpoint[theirs] for (ours, *_), theirs in zip(MLM_KEYS, keys)}
            head.load_state_dict(state)
            return True
    return False


def pretrained_tensors(name: str) -> dict[str, torch.Tensor]:
    """The encoder checkpoint's tensors (to find an MLM head), or {} when there is no local safetensors file."""
    from safetensors.torch import load_file

    from carlrar.models import resolve

    folder = Path(resolve(name))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return {k: v for f in files for k, v in load_file(str(f)).items()}


@dataclass
class ReconstructionConfig:
    """RAR (Eq. 7)."""

    rar_weight: float = _f(0.1, "w_r: weight of L_R next to L_C on every adversarial pass (Eq. 7: 0.1)")
    rar_passes: str = _f("all", "all: L_R on every FreeLB pass (paper); last: only on the last pass (cheaper)",
                         choices=["all", "last"])
    # beyond the paper (defaults keep the paper's behaviour)
    rar_ascent: str = _f("total", "what δ ascends between passes: total (L_C + w_r·L_R, FreeLB's pass loss) or "
                                  "classification (L_C alone: Eq. 7's inner max)", choices=["total", "classification"])
    rar_weight_ratio: float = _f(0.0, "> 0: w_r = min(rar_weight, ratio · ‖∇L_C‖ / ‖∇L_R‖), measured every "
                                      "--rar_balance_steps steps (0: fixed rar_weight)")
    rar_balance_steps: int = _f(25, "steps between two measurements of the balanced weight")
    rar_warmup_steps: int = _f(0, "before RAR's first step, fit the reconstructor alone on clean token states for "
                                  "this many batches, encoder frozen (stands in for a pretrained MLM head)")
    rar_warmup_lr: float = _f(1e-3, "learning rate of the reconstructor warm-up (AdamW)")
    rar_warmup_batch_size: int = _f(32, "rows per warm-up batch (a training batch: each costs a vocabulary-wide "
                                        "backward, so not the evaluation batch)")

    LIMITS: ClassVar[Limits] = Limits(minimum={"rar_weight": 0, "rar_weight_ratio": 0, "rar_balance_steps": 1,
                                               "rar_warmup_steps": 0, "rar_warmup_batch_size": 1},
                                      above={"rar_warmup_lr": 0})

    def __post_init__(self):
        check(self)


class ReconstructionTerm(ObjectiveTerm):
    """RAR's w_r·L_R as a term of FreeLB's passes (Eq. 7): each adversarial pass's token states go through the
    reconstructor, scored against the original ids. With ``rar_passes="all"`` (the paper) every pass adds
    w_r·L_R / n, with ``"last"`` only the last adds w_r·L_R: the same total weight either way.

    Args: ``config`` (ReconstructionConfig), ``adv`` (the FreeLB config), ``model`` (a Classifier: the head is added
    to ``model.heads``, initialised from the encoder's MLM head when ``model_name``'s checkpoint has one).

    Relations: BERT's masked-LM loss with nothing masked and δ as the corruption (a denoising auto-encoder);
    ``carlrar generate`` decodes the same head's argmax into text (Table 6).

    Example::

        term = ReconstructionTerm(ReconstructionConfig(), AdversarialConfig(), model)
        freelb_step(model, batch, lambda loss: loss.backward(), AdversarialConfig(), terms=(term,))
    """

    def __init__(self, config: ReconstructionConfig, adv, model, model_name: str | None = None, seed: int = 0):
        self.config, self.adv, self.seed = config, adv, seed
        self.head = attach_reconstructor(model)
        self.head_from_mlm = bool(model_name) and load_mlm_head(self.head, pretrained_tensors(model_name))
        self.warmed = config.rar_warmup_steps == 0
        self.weight, self.balanced_at, self.step = config.rar_weight, None, 0

    @classmethod
    def from_run(cls, configs, model, train_labels, total_steps, train_config):
        from carlrar.methods.adversarial import AdversarialConfig

        return cls(configs[ReconstructionConfig], configs[AdversarialConfig], model, getattr(train_config, "model", None),
                   getattr(train_config, "seed", 0))

    def begin(self, batch, step):
        self.step = step

    def pass_loss(self, model, batch, out, t, n, replay, loss_C) -> TermLoss:
        c = self.config
        if c.rar_passes == "last" and t < n - 1:
            return NOTHING
        logits = model.heads["reconstructor"](out.token_states)
        loss = reconstruction_loss(logits, batch["input_ids"], batch["attention_mask"])
        if c.rar_weight_ratio > 0 and t == n - 1 and self.balanced_at != self.step \
                and self.step % c.rar_balance_steps == 0:
            self.weight, self.balanced_at = balanced_weight(model, loss_C, loss, c.rar_weight_ratio, c.rar_weight), self.step
        k = n if c.rar_passes == "all" else 1  # same total weight either way
        logs = {"loss_R": loss.item() / k, **({"rar_weight": self.weight} if c.rar_weight_ratio > 0 and t == n - 1
                                              else {})}
        return TermLoss(self.weight * loss / k, logs, raw={"R": loss}, ascend=c.rar_ascent == "total",
                        weight=self.weight / k)

    def before_step(self, step, model, data, collate, batch_size) -> bool:
        """The reconstructor warm-up, once, before RAR's first step. True when it ran (the loop checkpoints)."""
        if self.warmed:
            return False
        warm_up_reconstructor(self.head, model, data, collate, self.config, self.seed)
        self.warmed = True
        return True

    def state_tensors(self):
        state = {"rar_warmed": torch.tensor(int(self.warmed))} if self.config.rar_warmup_steps else {}
        if self.config.rar_weight_ratio > 0:
            state["rar_weight"] = torch.tensor(self.weight, dtype=torch.float64)
        return state

    def load_state_tensors(self, state):
        self.warmed = bool(state.get("rar_warmed", torch.tensor(int(self.warmed))).item())
        self.weight = float(state["rar_weight"]) if "rar_weight" in state else self.weight


def warm_up_reconstructor(head: Reconstructor, model, data, collate, config, seed: int):
    """Fit the head alone (dense, LayerNorm, vocab bias; not the tied embeddings) on clean token states, encoder
    frozen and in eval mode, for ``rar_warmup_steps`` seeded batches: what a pretrained MLM head gives ALBERT in the
    paper and MiniLM lacks. Its own generator: the training RNG does not move (exact resume)."""
    from tqdm.auto import tqdm

    params = [head.dense.weight, head.dense.bias, head.layer_norm.weight, head.layer_norm.bias, head.bias]
    optimizer = torch.optim.AdamW(params, lr=config.rar_warmup_lr)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 7919))
    was_training, tied = model.training, model.word_embeddings.weight
    model.eval()
    tied.requires_grad_(False)  # the decoder weight is the encoder's, not warmed: its 30k-row gradient is skipped
    steps, batch_size = config.rar_warmup_steps, config.rar_warmup_batch_size
    try:
        for k in tqdm(range(steps), desc="reconstructor warm-up", disable=not sys.stderr.isatty(), leave=False):
            idx = order[(torch.arange(batch_size) + k * batch_size) % len(data)].tolist()
            b = {key: v.to(model.device) for key, v in collate([data[i] for i in idx]).items()}
            real = b["attention_mask"].bool()
            with torch.no_grad():
                states = model(b["input_ids"], b["attention_mask"]).token_states[real]
            # = reconstruction_loss over the batch (the mean over real positions), without projecting the padding
            # of these unsorted batches onto the vocabulary
            loss = F.cross_entropy(head(states), b["input_ids"][real])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        tied.requires_grad_(True)
        model.train(was_training)
