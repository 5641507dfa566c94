"""Achieved training FLOP/s on real (non-pad) tokens vs this machine's fp32 matmul FLOP/s, from one run.

Useful FLOPs are counted from the model's dimensions and each example's real tokens
(``carlrar.models.train_flops_per_token``: 3 × forward matmul FLOPs); padding and the optimiser count as overhead.
The matmul peak (2048² fp32 matmul, same thread count) is timed just before and just after training, because it
swings with host load (≈ 130–184 GFLOP/s on 2 threads here). Target: useful / peak ≥ 0.75.

    .venv/bin/python benchmarks/flops.py                 # base on 4,000 SST-2 examples, about 1 minute
    .venv/bin/python benchmarks/flops.py --method freelb # FreeLB's n passes all count as useful
    .venv/bin/python benchmarks/flops.py --dataset agnews --batch-size 16   # longer texts (~50 tokens vs ~13)
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CARLRAR_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import torch  # noqa: E402
import transformers  # noqa: E402

from carlrar.config import TrainConfig  # noqa: E402
from carlrar.speed import measure_matmul_peak  # noqa: E402
from carlrar.train import train  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="base")
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    before = measure_matmul_peak(seconds=2.0)
    with tempfile.TemporaryDirectory() as tmp:
        final = train(TrainConfig(dataset=args.dataset, model="minilm", method=args.method, train_subset=args.examples,
                                  epochs=1, batch_size=args.batch_size, lr=5e-5, eval_steps=0, log_steps=10**6,
                                  seed=0, output_dir=f"{tmp}/run"))
    after = measure_matmul_peak(seconds=2.0)
    useful = final["useful_gflops_per_s"]
    peak = (before / 1e9 + after / 1e9) / 2
    print(f"{args.method} · MiniLM · {args.examples:,} {args.dataset} examples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads · {final['examples_per_s']} examples/s")
    print(f"useful training FLOP/s (real tokens):  {useful:7.1f} GFLOP/s")
    print(f"fp32 matmul peak, before / after:       {before / 1e9:7.1f} / {after / 1e9:.1f} GFLOP/s")
    print(f"fraction of peak (mean of the two):     {useful / peak:7.2f}   (target ≥ 0.75)")


if __name__ == "__main__":
    main()
