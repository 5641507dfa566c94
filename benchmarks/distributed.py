"""1 process vs 2 processes on this machine, and the cost of CARL's per-step bank synchronisation. One run, printed.

A. ``carlrar train`` (base and carl) on the same seeded SST-2 subset, global batch 32: one process with 2 threads
   vs ``torchrun --nproc_per_node=2`` with 1 thread each (gloo). On 2 cores this measures the overhead of
   data parallelism, not a speed-up.
B. Under torchrun with 2 processes: milliseconds per step spent gathering the new bank rows (16 per process:
   indices, R and R^adv of size 384) and applying them, next to CARL's measured step time from part A.

    .venv/bin/python benchmarks/distributed.py             # about 6 minutes
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CARLRAR_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(method: str, processes: int, examples: int, tmp: str) -> dict:
    out = Path(tmp) / f"{method}-{processes}"
    args = ["-m", "carlrar.cli", "train", "--dataset", "sst2", "--model", "minilm", "--method", method,
            "--train_subset", str(examples), "--epochs", "1", "--lr", "5e-5", "--batch_size", str(32 // processes),
            "--eval_steps", "0", "--seed", "0", "--threads", str(2 // processes), "--carl_start_step", "0.25",
            "--carl_negatives", "1900", "--output_dir", str(out)]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    subprocess.run(launcher + args, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "final_metrics.json").read_text())


def bank_sync(steps: int):
    """Runs inside torchrun: the per-step gather + momentum update of CARL's two banks."""
    import torch
    import torch.distributed as dist

    from carlrar.distributed import gather_rows
    from carlrar.objectives import MemoryBank

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    banks = MemoryBank(8000, 384), MemoryBank(8000, 384)
    g = torch.Generator().manual_seed(dist.get_rank())
    times = []
    for _ in range(steps):
        index = torch.randint(8000, (16,), generator=g)
        R, R_adv = torch.randn(16, 384, generator=g), torch.randn(16, 384, generator=g)
        dist.barrier()
        start = time.perf_counter()
        index, R, R_adv = gather_rows(index, R, R_adv)
        banks[0].update(index, R)
        banks[1].update(index, R_adv)
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        times.sort()
        print(json.dumps({"median_ms": 1000 * times[len(times) // 2]}))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--sync-only", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sync_only:
        return bank_sync(args.sync_only)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("base", "carl"):
            for processes in (1, 2):
                results[method, processes] = train(method, processes, args.examples, tmp)
    print(f"A. {args.examples:,} SST-2 examples, one epoch, global batch 32, MiniLM "
          "(1 process × 2 threads vs 2 processes × 1 thread)")
    for method in ("base", "carl"):
        one, two = results[method, 1]["examples_per_s"], results[method, 2]["examples_per_s"]
        print(f"   {method:5s}  1 process {one:6.1f} ex/s   2 processes {two:6.1f} ex/s   ratio {two / one:.2f}")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", __file__, "--sync-only", "200"],
                         check=True, capture_output=True, text=True).stdout
    ms = json.loads(out.strip().splitlines()[-1])["median_ms"]
    step_ms = 1000 * 32 / results["carl", 2]["examples_per_s"]
    print(f"B. bank sync (gather 2 × 16 rows + update both banks), 2 processes: {ms:.2f} ms per step = "
          f"{ms / step_ms:.2%} of a 2-process CARL step ({step_ms:.0f} ms, mean over the run incl. pre-start steps)")


if __name__ == "__main__":
    main()
