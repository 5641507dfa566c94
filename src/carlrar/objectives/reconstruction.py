"""RAR's reconstructor and its loss (Eq. 7): rebuild the original tokens from adversarial token states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self._tied[0].weight

    def forward(self, token_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (batch × len × vocab)."""
        h = self.layer_norm(self.act(self.dense(token_states)))
        return F.linear(h, self.decoder_weight, self.bias)


def reconstruction_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L_R: cross-entropy against the original ids, averaged over real (non-pad) positions. Special tokens
    ([CLS], [SEP]) are real positions and count, like any other token."""
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
