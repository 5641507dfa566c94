"""Shared fixtures: a tiny random BERT (with MiniLM's real tokenizer) and small labelled files."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

POSITIVE = ["a wonderful film", "great acting and a moving story", "i loved it", "brilliant and funny",
            "a delight from start to finish", "superb", "warm , witty and wise", "the best film this year"]
NEGATIVE = ["a terrible film", "boring and far too long", "i hated it", "dull and lifeless",
            "a mess from start to finish", "awful", "cold , flat and stupid", "the worst film this year"]


def make_tiny_bert(path: Path, dropout: float, hidden: int = 32, init_range: float = 0.02,
                   seed: int | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from carlrar.models import minilm_path

    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128, initializer_range=init_range,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if seed is not None:
        torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


TOY_TRAIN = [(t, 1) for t in POSITIVE] * 4 + [(t, 0) for t in NEGATIVE] * 4  # 64 rows, each sentence 4 times


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32, dropout-free random BERT saved as a local model directory, with the MiniLM tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.0, seed=0)  # same weights every run


@pytest.fixture(scope="session")
def tiny_learner_dir(tmp_path_factory) -> Path:
    """Hidden 64, init range 0.2, seed 0: unlike the 0.02-init models, it learns the toy task within ~100 steps
    with FreeLB, so its representations mean something (a collapsed R gives cos(R, R^adv) = 1 for free)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-learner"), dropout=0.0, hidden=64, init_range=0.2, seed=0)


@pytest.fixture(scope="session")
def tiny_dropout_model_dir(tmp_path_factory) -> Path:
    """The same with dropout 0.1: anything that moves the RNG shows up in its results."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), dropout=0.1, seed=0)


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def toy_files(tmp_path) -> dict:
    """Toy sentiment train/dev TSVs (header sentence, label) under tmp_path."""
    dev = [(t, 1) for t in POSITIVE[:4]] + [(t, 0) for t in NEGATIVE[:4]]
    return {"train": write_tsv(tmp_path / "train.tsv", TOY_TRAIN), "dev": write_tsv(tmp_path / "dev.tsv", dev)}


def checkpoint_step(state: Path) -> int:
    """Step of the checkpoint on disk; -1 while there is none (or it is being swapped in under our feet)."""
    try:
        return json.loads(state.read_text() or "{}").get("step", 0)
    except (FileNotFoundError, json.JSONDecodeError):
        return -1
