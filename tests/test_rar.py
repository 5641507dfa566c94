"""RAR against hand computations: parameter counts (Table 7), tied decoder, L_R, training and generation."""

import json
import math

import pytest
import torch
from torch import nn

from carlrar.config import TrainConfig
from carlrar.methods import AdversarialConfig, ReconstructionConfig
from carlrar.models import albert_base_scratch, count_parameters, load_trained
from carlrar.objectives.reconstruction import (ReconstructionTerm, Reconstructor, load_mlm_head,
                                               reconstruction_loss)
from carlrar.train import train
from conftest import NEGATIVE, POSITIVE


def test_albert_with_reconstructor_has_the_papers_parameter_count():
    model = albert_base_scratch(["negative", "positive"])
    assert count_parameters(model) == 11_685_122
    ReconstructionTerm(ReconstructionConfig(), AdversarialConfig(), model)
    assert count_parameters(model) == 11_813_810  # Table 7: + dense 98,432 + LayerNorm 256 + vocab bias 30,000
    head = model.heads["reconstructor"]
    assert head.decoder_weight is model.word_embeddings.weight  # one tensor, not a copy
    assert head.decoder_weight.data_ptr() == model.word_embeddings.weight.data_ptr()
    assert "heads.reconstructor.bias" in model.state_dict() and not any(
        k.startswith("heads.") and "embeddings" in k for k in model.state_dict())


def test_reconstruction_loss_by_hand_excludes_padding():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, -9.0]]])  # 3rd position is padding
    ids, mask = torch.tensor([[0, 2, 1]]), torch.tensor([[1, 1, 0]])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))  # target 0
    ce1 = -math.log(1 / (2 + math.e))  # target 2 against logits (0, 1, 0)
    assert reconstruction_loss(logits, ids, mask).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_head_shapes_and_mlm_init_from_bert_keys():
    emb = nn.Embedding(10, 4)
    head = Reconstructor(6, emb)
    assert head(torch.randn(2, 3, 6)).shape == (2, 3, 10)
    ckpt = {"cls.predictions.transform.dense.weight": torch.ones(4, 6), "cls.predictions.transform.dense.bias":
            torch.zeros(4), "cls.predictions.transform.LayerNorm.weight": torch.full((4,), 2.0),
            "cls.predictions.transform.LayerNorm.bias": torch.zeros(4), "cls.predictions.bias": torch.arange(10.0)}
    assert load_mlm_head(head, ckpt)
    assert torch.equal(head.bias, torch.arange(10.0)) and torch.equal(head.layer_norm.weight, torch.full((4,), 2.0))
    assert not load_mlm_head(Reconstructor(6, emb), {"encoder.x": torch.zeros(1)})  # no MLM head: stays random


@pytest.fixture(scope="module")
def rar_run(tiny_model_dir, tmp_path_factory):
    from conftest import TOY_TRAIN, write_tsv

    d = tmp_path_factory.mktemp("rar")
    write_tsv(d / "train.tsv", TOY_TRAIN)
    write_tsv(d / "dev.tsv", TOY_TRAIN[::4])
    cfg = TrainConfig(method="rar", model=str(tiny_model_dir), train_file=str(d / "train.tsv"),
                      dev_file=str(d / "dev.tsv"), text_column="sentence", output_dir=str(d / "out"), batch_size=8,
                      lr=5e-3, max_steps=120, warmup_ratio=0.0, eval_steps=0, seed=0, group_by_length=False)
    train(cfg, AdversarialConfig(adv_init_mag=0.0, adv_lr=0.05), ReconstructionConfig(rar_weight=1.0))
    return d


def test_rar_learns_to_reconstruct_and_generation_round_trips(rar_run, tiny_model_dir):
    from transformers import AutoTokenizer, pipeline

    from carlrar.data import EncodedSplit, Split
    from carlrar.generate import generate_split, summarize

    out = rar_run / "out"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train_loss_R"] < metrics[0]["train_loss_R"]  # L_R falls
    model = load_trained(out)  # the reconstructor comes back with the model
    assert "reconstructor" in model.heads
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(out / "checkpoint" / "model.safetensors")))  # last, not best-dev, weights
    assert model.heads["reconstructor"].decoder_weight is model.word_embeddings.weight  # still tied after loading
    assert pipeline("text-classification", model=str(out))("a wonderful film")[0]["label"] in ("0", "1")
    tok = AutoTokenizer.from_pretrained(out)
    texts = POSITIVE + NEGATIVE
    data = EncodedSplit(Split(texts, [1] * 8 + [0] * 8, "toy"), tok, 32)
    clean = generate_split(model, tok, data, texts, ["0", "1"], eps=0.0, steps=0, progress=False)
    s = summarize(clean)
    assert s["mean_edit_rate"] < 0.2, s  # chance would be ~1: 30,522-word vocabulary
    assert s["changed"] <= 0.5, s  # most clean inputs come back as themselves
    attacked = summarize(generate_split(model, tok, data, texts, ["0", "1"], eps=5.0, steps=5, progress=False))
    assert attacked["mean_edit_rate"] >= s["mean_edit_rate"]


def test_cli_generate_augment_and_retrain(rar_run, tiny_model_dir, tmp_path, capsys):
    from carlrar.cli import main

    out, samples = rar_run / "out", tmp_path / "samples.jsonl"
    main(["generate", "--model", str(out), "--file", str(rar_run / "dev.tsv"), "--text-column", "sentence",
          "--eps", "2.0", "--steps", "3", "--target", str(out), "--output", str(samples)])
    records = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(records) == 16 and {"text", "generated", "label", "edit_rate", "model_on_generated",
                                   "target_on_original"} <= set(records[0])
    summary = json.loads((tmp_path / "samples_summary.json").read_text())
    assert summary["n"] == 16 and 0 <= summary["transfer_success_rate"] <= 1
    assert summary["changed"] == pytest.approx(sum(r["changed"] for r in records) / 16)
    right = [r for r in records if r["target_on_original"] == r["label"]]
    fooled = [r for r in right if r["changed"] and r["target_on_generated"] != r["label"]]
    assert summary["transfer_success_rate"] == pytest.approx(len(fooled) / max(len(right), 1))
    aug = tmp_path / "aug.tsv"
    main(["augment", "--samples", str(samples), "--output", str(aug), "--with-originals"])
    lines = aug.read_text().splitlines()
    written = sum(r["changed"] and bool(r["generated"].split()) for r in records)  # empty decodes are skipped
    assert lines[0] == "text\tlabel" and len(lines) - 1 == written + 16
    train(TrainConfig(model=str(tiny_model_dir), train_file=str(aug), output_dir=str(tmp_path / "re"), max_steps=2,
                      batch_size=8))  # the augmented file is a valid training file
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a model without a reconstructor cannot generate
        main(["generate", "--model", str(tmp_path / "re"), "--file", str(aug)])
    assert exit_info.value.code == 2 and "no reconstructor" in capsys.readouterr().err
