"""Data-parallel training: 2 CPU processes (torchrun, gloo) vs 1 process with the same global batch and seed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import checkpoint_step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model, toy_files, out, method, processes: int, wait: bool = True, steps: int = 6):
    """Global batch 8 either way: 8 on one process, 4 on each of two."""
    args = ["-m", "carlrar.cli", "train", "--model", str(model), "--train_file", str(toy_files["train"]),
            "--dev_file", str(toy_files["dev"]), "--text_column", "sentence", "--output_dir", str(out),
            "--method", method, "--max_steps", str(steps), "--eval_steps", "3", "--lr", "1e-3", "--seed", "0",
            "--threads", "1", "--batch_size", str(8 // processes),
            # γ = 0: δ's random init is drawn per process, so only a zero init is comparable across process counts
            "--adv_init_mag", "0", "--carl_negatives", "8", "--carl_start_step", "2"]
    args[args.index("--carl_start_step") + 1] = "2" if steps == 6 else "12"
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(launcher + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if wait:
        output = proc.communicate()[0].decode()
        assert proc.returncode == 0, output[-3000:]
    return proc


def assert_same_state(a, b):
    for f in ("checkpoint/model.safetensors", "checkpoint/method_state.safetensors"):
        if (a / f).exists() or (b / f).exists():
            x, y = load_file(str(a / f)), load_file(str(b / f))
            assert x.keys() == y.keys()
            for k in x:
                if k.endswith("attention.self.key.bias"):
                    # softmax ignores a bias added to every key alike: it gets no gradient, only Adam's steps on
                    # rounding noise (values ~1e-5 whose sign differs with the machine's kernels)
                    continue
                assert torch.allclose(x[k].float(), y[k].float(), atol=2e-5), (f, k)


# the tiny model has no dropout; with dropout the masks differ per process count, as do δ's random inits
@pytest.mark.parametrize("method", ["base", "freelb", "carl", "rar", "pgd", "fgm", "carl-rar"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, toy_files, tmp_path, method):
    run(tiny_model_dir, toy_files, tmp_path / "one", method, 1)
    run(tiny_model_dir, toy_files, tmp_path / "two", method, 2)
    assert_same_state(tmp_path / "one", tmp_path / "two")  # weights, and CARL's two banks on the main process
    metrics = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [m["step"] for m in metrics(tmp_path / "two")] == [3, 6]  # evaluated once per eval step, not per process
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["dev_loss"] for m in one] == pytest.approx([m["dev_loss"] for m in two], abs=1e-5)


def test_two_process_carl_run_killed_and_resumed(tiny_model_dir, toy_files, tmp_path):
    run(tiny_model_dir, toy_files, tmp_path / "one", "carl", 1, steps=60)
    out = tmp_path / "two"
    proc = run(tiny_model_dir, toy_files, out, "carl", 2, wait=False, steps=60)
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once the step-3 checkpoint (banks filled) exists
        if checkpoint_step(state) >= 3:
            subprocess.run(["pkill", "-9", "-f", str(out)])  # torchrun and both workers, mid-run
            break
        time.sleep(0.05)
    proc.wait()
    time.sleep(0.5)
    assert proc.returncode == -signal.SIGKILL and not (out / "final_metrics.json").exists()
    run(tiny_model_dir, toy_files, out, "carl", 2, steps=60)  # the same command again resumes
    assert_same_state(tmp_path / "one", out)
