"""Parameter counts (Table 7), the embeddings-first forward, FLOP counting."""

import torch

from carlrar.models import (Classifier, albert_base_scratch, count_parameters, load_classifier,
                            train_flops_per_token)


def test_albert_base_scratch_has_the_papers_parameter_count():
    model = albert_base_scratch(["negative", "positive"])
    assert count_parameters(model) == 11_685_122  # Table 7, ALBERT base + classifier
    assert model.word_embeddings.weight.shape == (30000, 128)  # δ lives in the 128-dim embedding space


def test_forward_from_embeddings_matches_forward_from_ids(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), ["a", "b", "c"]).eval()
    ids = torch.tensor([[101, 2000, 2001, 102, 0], [101, 2003, 102, 0, 0]])
    mask = (ids != 0).long()
    ours = model(ids, mask)
    ref = model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-6)
    assert torch.equal(ours.R, ours.token_states[:, 0])  # R = final [CLS] state
    assert torch.allclose(ours.token_states, ref.hidden_states[-1], atol=1e-6)
    zero = model(ids, mask, delta=torch.zeros(2, 5, 32))
    assert torch.allclose(zero.logits, ours.logits, atol=1e-6)
    moved = model(ids, mask, delta=torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)))
    assert (moved.token_states - ours.token_states).abs().max() > 0.1  # δ reaches the encoder
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_flops_per_token_by_hand():
    from transformers import BertConfig

    c = BertConfig(hidden_size=4, num_hidden_layers=2, intermediate_size=8)
    # per layer: 4·4² + 2·4·8 = 128 matmul params → forward 2·(2·128) + 2 layers·2·2·seq·h (seq 10) = 512 + 320
    assert train_flops_per_token(c, 10) == 3 * (512 + 320)
    from transformers import AlbertConfig

    a = AlbertConfig(embedding_size=2, hidden_size=4, num_hidden_layers=2, intermediate_size=8)
    assert train_flops_per_token(a, 10) == 3 * (2 * (256 + 8) + 320)  # + the 2→4 embedding projection


def test_count_parameters_counts_tied_tensors_once():
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.Module()
    model.a, model.b = lin, torch.nn.Linear(3, 3)
    model.b.weight = lin.weight
    assert count_parameters(model) == 9 + 3 + 3
    assert isinstance(Classifier(torch.nn.Identity()), torch.nn.Module)


def test_albert_scratch_tokenizer_offline_is_trained_on_the_texts(monkeypatch):
    from carlrar.models import load_tokenizer
    from conftest import NEGATIVE, POSITIVE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer("albert-base-v2-scratch", (POSITIVE + NEGATIVE) * 3)
    ids = tok("A wonderful film")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert len(tok) <= 30000 and tok.pad_token_id is not None
    model = albert_base_scratch(["negative", "positive"])
    out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert out.R.shape == (1, 768) and out.token_states.shape == (1, len(ids), 768)
