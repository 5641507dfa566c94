"""Guards: non-finite losses and gradients, untrusted checkpoints and model code, failed checkpoint writes, kill -9."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from carlrar.errors import UserError
from carlrar.methods import Method
from carlrar.train import train
from conftest import checkpoint_step
from test_train import cfg_for


def poison(monkeypatch, method: str, at_call: int, where: str):
    """Make the ``at_call``-th training step of ``method`` produce a NaN loss value or a NaN gradient."""
    real, calls = Method.training_step, {"n": 0}

    def step(self, model, batch, backward, scale=1.0, step=0, **kw):
        calls["n"] += 1
        if calls["n"] != at_call:
            return real(self, model, batch, backward, scale, step, **kw)
        if where == "loss":
            logs = real(self, model, batch, backward, scale, step, **kw)
            return {**logs, "loss": float("nan")}
        return real(self, model, batch, lambda loss: backward(loss * float("nan")), scale, step, **kw)

    monkeypatch.setattr(Method, "training_step", step)


@pytest.mark.parametrize("method, where", [("freelb", "loss"), ("base", "gradient")])
def test_non_finite_stops_with_the_step_and_term(tiny_model_dir, toy_files, tmp_path, monkeypatch, method, where):
    poison(monkeypatch, method, 3, where)
    with pytest.raises(UserError, match=f"non-finite {where} at step 2 "):
        train(cfg_for(tiny_model_dir, toy_files, tmp_path / "run", method=method))


def test_skip_nonfinite_skips_and_counts(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    poison(monkeypatch, "base", 3, "gradient")
    final = train(cfg_for(tiny_model_dir, toy_files, tmp_path / "run", skip_nonfinite=True))
    assert final["skipped_steps"] == 1 and final["steps"] == 6
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]


def interrupted_run(tiny_model_dir, toy_files, out, monkeypatch):
    """A run stopped after its step-4 checkpoint."""
    real, calls = Method.training_step, {"n": 0}

    def stop(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Method, "training_step", stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_model_dir, toy_files, out))
    monkeypatch.setattr(Method, "training_step", real)


class Payload:
    """Unpickling this would run code: it must never happen when resuming."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code_and_reports_a_bad_checkpoint(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    interrupted_run(tiny_model_dir, toy_files, out, monkeypatch)
    torch.save({"state": Payload(marker)}, out / "checkpoint" / "optimizer.bin")
    with pytest.raises(UserError, match="cannot resume from this checkpoint.*--overwrite"):
        train(cfg_for(tiny_model_dir, toy_files, out))
    assert not marker.exists()  # torch.load(weights_only=True) refused the payload
    (out / "checkpoint" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot resume"):
        train(cfg_for(tiny_model_dir, toy_files, out))
    train(cfg_for(tiny_model_dir, toy_files, out, overwrite=True))  # the advertised way out works


def test_remote_code_does_not_run_without_the_flag(tmp_path, toy_files):
    model, marker = tmp_path / "custom", tmp_path / "ran"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModelForSequenceClassification": "modeling_evil.Evil"}}))
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    from carlrar.models import load_classifier

    with pytest.raises(UserError, match="cannot load model"):
        load_classifier(str(model), ["0", "1"])
    assert not marker.exists()


def test_failed_checkpoint_write_keeps_the_last_complete_one(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out, real, calls = tmp_path / "run", Accelerator.save_state, {"n": 0}

    def disk_full_on_third(self, path, *a, **kw):
        calls["n"] += 1
        real(self, path, *a, **kw)
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", disk_full_on_third)
    with pytest.raises(UserError, match="No space left on device.*last complete checkpoint is kept"):
        train(cfg_for(tiny_model_dir, toy_files, out))
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not (out / "checkpoint.tmp").exists()
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert train(cfg_for(tiny_model_dir, toy_files, out))["steps"] == 6  # resumes from step 4


def cli_train(model, toy_files, out, method) -> list[str]:
    return [sys.executable, "-m", "carlrar.cli", "train", "--model", str(model), "--train_file",
            str(toy_files["train"]), "--dev_file", str(toy_files["dev"]), "--text_column", "sentence",
            "--output_dir", str(out), "--method", method, "--max_steps", "40", "--eval_steps", "2",
            "--batch_size", "8", "--lr", "1e-3", "--carl_negatives", "8", "--carl_start_step", "14", "--threads", "1"]


@pytest.mark.parametrize("method", ["freelb", "carl"])
def test_kill_9_at_random_moments_then_resume_matches_the_straight_run(tiny_dropout_model_dir, toy_files, tmp_path,
                                                                       method):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cli_train(tiny_dropout_model_dir, toy_files, straight, method), env=env, check=True,
                   capture_output=True)
    rng, kills = random.Random(0), 0
    state = killed / "checkpoint" / "trainer_state.json"
    # kill 0–0.3 s after the checkpoint of a random step appears: mid-training, mid-evaluation, mid-checkpoint
    # write, or (CARL, fill before step 14) mid-fill; then once more during start-up; then run to the end
    for target in [*sorted(rng.sample(range(2, 38, 2), 3)), None, "end"]:
        if target == "end" and (killed / "final_metrics.json").exists():
            break  # a fast machine finished the run inside the start-up stage's window: nothing left to resume
        proc = subprocess.Popen(cli_train(tiny_dropout_model_dir, toy_files, killed, method), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if target == "end":
            assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
            break
        while target is not None and proc.poll() is None and checkpoint_step(state) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3) if target is not None else rng.uniform(0.2, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3 and (killed / "final_metrics.json").exists()
    assert not any(p.name.startswith("checkpoint.") for p in killed.iterdir())
    for f in ("model.safetensors", "checkpoint/model.safetensors"):  # best-dev and last weights
        a, b = load_file(str(straight / f)), load_file(str(killed / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    metrics = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert metrics(killed) == metrics(straight)
