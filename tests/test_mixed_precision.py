"""--mixed_precision: bf16 autocast of the training passes on CPU gives finite losses that differ from fp32's (so
autocast is on), while the weights, CARL's memory banks and the saved model stay float32; fp16 on a CPU is a
one-line error."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from carlrar.cli import main
from carlrar.config import TrainConfig
from carlrar.methods import ContrastiveConfig
from carlrar.train import train


def run(tiny_dropout_model_dir, toy_files, out, precision: str) -> list[dict]:
    cfg = TrainConfig(model=str(tiny_dropout_model_dir), train_file=str(toy_files["train"]),
                      dev_file=str(toy_files["dev"]), text_column="sentence", output_dir=str(out), batch_size=8,
                      lr=1e-3, max_steps=6, eval_steps=1, log_steps=100, seed=0, threads=1, method="carl-rar",
                      mixed_precision=precision)
    from carlrar.methods import AdversarialConfig, ReconstructionConfig

    train(cfg, AdversarialConfig(), ContrastiveConfig(carl_start_step=3, carl_negatives=8), ReconstructionConfig())
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_on_cpu_trains_with_finite_losses_and_float32_state(tiny_dropout_model_dir, toy_files, tmp_path):
    fp32 = run(tiny_dropout_model_dir, toy_files, tmp_path / "fp32", "no")
    bf16 = run(tiny_dropout_model_dir, toy_files, tmp_path / "bf16", "bf16")
    keys = ("train_loss", "train_loss_R", "train_loss_D")
    assert all(k in bf16[-1] for k in keys)  # L_D started (step 3) and L_R ran under bf16
    assert all(math.isfinite(e[k]) for e in bf16 for k in keys if k in e)
    # autocast is really on: the numbers move, but only by bf16's rounding
    assert [e["train_loss"] for e in bf16] != [e["train_loss"] for e in fp32]
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], rel=0.02)
    state = load_file(str(tmp_path / "bf16" / "checkpoint" / "method_state.safetensors"))
    assert state["bank_orig"].dtype == state["bank_adv"].dtype == torch.float32
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


@pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 is refused only where there is no GPU")
def test_fp16_on_a_cpu_is_a_one_line_error(tiny_model_dir, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(tiny_model_dir), "--train_file", str(toy_files["train"]), "--text_column",
              "sentence", "--output_dir", str(out), "--max_steps", "1", "--mixed_precision", "fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: mixed_precision = 'fp16': needs a GPU")
    assert not out.exists()  # refused before the output directory is touched
