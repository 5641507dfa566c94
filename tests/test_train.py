"""The training loop end to end on a tiny model: CLI, outputs, pipeline(), config precedence, accumulation, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from carlrar.cli import main
from carlrar.config import TrainConfig
from carlrar.train import train


def cfg_for(tiny_model_dir, toy_files, out, **kw) -> TrainConfig:
    base = dict(model=str(tiny_model_dir), train_file=str(toy_files["train"]), dev_file=str(toy_files["dev"]),
                text_column="sentence", output_dir=str(out), batch_size=8, lr=1e-3, max_steps=6, eval_steps=2,
                log_steps=2, seed=0)
    return TrainConfig(**{**base, **kw})


def test_cli_train_evaluate_predict_and_pipeline(tiny_model_dir, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--model", str(tiny_model_dir), "--train_file", str(toy_files["train"]), "--dev_file",
          str(toy_files["dev"]), "--text_column", "sentence", "--output_dir", str(out), "--max_steps", "40",
          "--batch_size", "8", "--lr", "5e-3", "--warmup_ratio", "0", "--eval_steps", "20", "--log_steps", "20"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "carlrar_config.yaml", "metrics.jsonl",
                 "final_metrics.json", "checkpoint/trainer_state.json"):
        assert (out / name).exists(), name
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [8, 16, 20, 24, 32, 40]  # every 20 steps and every epoch end (8)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["dev"]["accuracy"] == max(e["dev_accuracy"] for e in evals)  # the kept model is the best one

    main(["evaluate", "--model", str(out), "--file", str(toy_files["dev"]), "--text-column", "sentence"])
    metrics = json.loads((out / "eval_dev.json").read_text())
    assert metrics["accuracy"] == pytest.approx(final["dev"]["accuracy"])  # re-evaluation agrees with training

    texts = tmp_path / "texts.txt"
    texts.write_text("a wonderful film\nawful\n")
    capsys.readouterr()
    main(["predict", "--model", str(out), "--file", str(texts)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["a wonderful film", "awful"]
    assert all(set(r["probabilities"]) == {"0", "1"} and abs(sum(r["probabilities"].values()) - 1) < 1e-4
               for r in rows)

    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out))
    got = pipe(["a wonderful film", "awful"])
    assert [g["label"] for g in got] == [r["label"] for r in rows]
    assert [round(g["score"], 4) for g in got] == [round(max(r["probabilities"].values()), 4) for r in rows]


def test_label_names_round_trip_through_pipeline(tiny_model_dir, tmp_path):
    from conftest import NEGATIVE, POSITIVE, write_tsv

    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    f = write_tsv(tmp_path / "named.tsv", rows, header=("text", "sentiment"))
    out = tmp_path / "named"
    train(TrainConfig(model=str(tiny_model_dir), train_file=str(f), label_column="sentiment",
                      output_dir=str(out), max_steps=2, batch_size=8))
    from transformers import pipeline

    labels = {r["label"] for r in pipeline("text-classification", model=str(out))(["good", "bad", "ok"])}
    assert labels <= {"neg", "pos"}
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_config_file_then_command_line_wins(tiny_model_dir, toy_files, tmp_path):
    from carlrar.config import parse_args
    from carlrar.methods import config_classes

    yml = tmp_path / "run.yaml"
    yml.write_text("lr: 3.0e-4\nbatch_size: 4\ngroup_by_length: false\n")
    cfg = parse_args((TrainConfig, *config_classes()), ["--config", str(yml), "--batch_size", "16"])[0]
    assert (cfg.lr, cfg.batch_size, cfg.group_by_length) == (3e-4, 16, False)
    cfg = parse_args((TrainConfig, *config_classes()), ["--preset", "demo", "--lr", "1e-4"])[0]
    assert (cfg.dataset, cfg.train_subset, cfg.lr) == ("sst2", 8000, 1e-4)


def final_weights(out):
    return load_file(str(out / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("method", ["base", "freelb"])
def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, toy_files, tmp_path, method):
    from carlrar.methods import AdversarialConfig

    big = cfg_for(tiny_model_dir, toy_files, tmp_path / "big", batch_size=8, group_by_length=False, max_steps=3,
                  method=method)
    acc = cfg_for(tiny_model_dir, toy_files, tmp_path / "acc", batch_size=4, grad_accum=2, group_by_length=False,
                  max_steps=3, method=method)
    knobs = [AdversarialConfig(adv_init_mag=0.0)] if method == "freelb" else []  # δ normalised per example
    train(big, *knobs), train(acc, *knobs)
    a, b = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    start = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    moved = a["hf.bert.encoder.layer.0.output.dense.weight"] - start["encoder.layer.0.output.dense.weight"]
    assert moved.abs().max() > 1e-4  # the weights did change
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k  # two half-batch sums vs one: float reordering only


@pytest.mark.parametrize("method", ["base", "freelb"])
def test_interrupted_run_resumes_to_the_same_weights(tiny_dropout_model_dir, toy_files, tmp_path, monkeypatch,
                                                     method):
    from carlrar.methods import Method

    tiny_model_dir = tiny_dropout_model_dir  # dropout and FreeLB's random init both draw from the RNG
    train(cfg_for(tiny_model_dir, toy_files, tmp_path / "straight", method=method))
    real_step, calls = Method.training_step, {"n": 0}

    def crash_on_fifth(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(Method, "training_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_model_dir, toy_files, tmp_path / "resumed", method=method))
    assert not (tmp_path / "resumed" / "final_metrics.json").exists()
    monkeypatch.setattr(Method, "training_step", real_step)
    train(cfg_for(tiny_model_dir, toy_files, tmp_path / "resumed", method=method))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert [r["step"] for r in lines("resumed")] == [2, 4, 6]
    assert [r["dev_loss"] for r in lines("resumed")] == [r["dev_loss"] for r in lines("straight")]


def test_throughput_never_reads_above_the_peak():
    """The start-up peak is a lower bound: a stretch faster than it raises it instead of printing > 100 %."""
    import torch
    from transformers import BertConfig

    from carlrar.speed import ThroughputMeter

    meter = ThroughputMeter(BertConfig(hidden_size=8, num_hidden_layers=1, intermediate_size=16,
                                       num_attention_heads=2), peak_flops=1.0)
    meter.add(torch.ones(4, 16, dtype=torch.long))
    examples_per_s, fraction = meter.read()
    assert examples_per_s > 0 and fraction == 1.0 and meter.peak > 1.0
    meter.reset()
    meter.add(torch.ones(1, 2, dtype=torch.long))
    assert 0 < meter.read()[1] <= 1.0


def test_a_labelled_test_split_is_evaluated_at_the_end_with_the_chosen_checkpoint(tiny_model_dir, toy_files, tmp_path):
    test = tmp_path / "test.tsv"
    test.write_text(toy_files["dev"].read_text())  # the dev rows again: the same accuracy as dev's must come out
    final = train(cfg_for(tiny_model_dir, toy_files, tmp_path / "run", test_file=str(test)))
    assert final["test"]["accuracy"] == final["dev"]["accuracy"]
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["test"] == final["test"]
    assert "test" not in train(cfg_for(tiny_model_dir, toy_files, tmp_path / "other"))
