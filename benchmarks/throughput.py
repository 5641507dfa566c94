"""Training throughput (examples/s) on 2 CPU threads, printed from one run.

A. base, freelb, carl, rar, carl-rar in one process on the same length-grouped SST-2 batches (optimiser step
   included; CARL's banks sized for full SST-2 and marked filled), ratios to base and to FreeLB.
B. carlrar's training loop (``carlrar.train.train``, method base) vs ``transformers.Trainer`` with
   ``train_sampling_strategy="group_by_length"`` (its fastest setting here) on the same model (MiniLM), the same
   4,000 SST-2 examples, batch 32, one epoch, fused AdamW both; each run a fresh process, rounds interleaved,
   medians compared. Target: carlrar ≥ 1.2 × Trainer.

    .venv/bin/python benchmarks/throughput.py            # both parts, about 10 minutes (15 with --malloc-env)
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CARLRAR_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from step_time import setup, time_methods  # noqa: E402

METHODS = ["base", "freelb n=2", "carl n=2", "rar n=2", "carl-rar n=2"]


def part_a(batch_size: int, n_batches: int, rounds: int):
    model, methods, batches, opt = setup(METHODS, batch_size, n_batches)
    times = {n: statistics.median(t) for n, t in time_methods(model, methods, batches, opt, rounds).items()}
    print(f"A. {n_batches} length-grouped SST-2 batches of {batch_size} × {rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"   {'method':14s} {'examples/s':>10s} {'× base':>8s} {'× freelb':>9s}")
    for n, t in times.items():
        print(f"   {n:14s} {batch_size / t:10.1f} {t / times['base']:8.2f} {t / times['freelb n=2']:9.2f}")


def carlrar_examples_per_s(n: int, batch_size: int, lr: float) -> float:
    from carlrar.config import TrainConfig
    from carlrar.train import train

    with tempfile.TemporaryDirectory() as tmp:
        final = train(TrainConfig(dataset="sst2", model="minilm", train_subset=n, epochs=1, batch_size=batch_size,
                                  lr=lr, eval_steps=0, log_steps=10**6, seed=0, output_dir=f"{tmp}/run"))
    return final["examples_per_s"]


def trainer_examples_per_s(n: int, batch_size: int, lr: float, strategy: str) -> float:
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from carlrar.data import load_dataset, subset
    from carlrar.models import minilm_path

    split = subset(load_dataset("sst2").split("train"), n, 0)  # the same examples carlrar trains on
    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = [{**tok(t, truncation=True, max_length=128), "labels": y} for t, y in zip(split.texts, split.labels)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch_size, num_train_epochs=1,
                                 learning_rate=lr, warmup_steps=-(-n // batch_size) // 10, train_sampling_strategy=strategy,
                                 save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, disable_tqdm=True)
        metrics = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorWithPadding(tok)).train().metrics
    return metrics["train_samples_per_second"]


# Each part-B measurement runs in a fresh process, rounds interleaved: on this shared host one process's speed
# drifts by ±10 % within minutes, and a cold start is what a user gets. With --malloc-env both sides are also
# timed with glibc told to keep freed memory (read from the environment at start-up): the 47 MB word-embedding
# gradient is then reused instead of being unmapped and faulted in again every step.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
SIDES = {"carlrar": ("carlrar train (base)", {}),
         "trainer": ("Trainer, group_by_length", {}),
         "carlrar-malloc": ("carlrar + malloc env", MALLOC_ENV),
         "trainer-malloc": ("Trainer + malloc env", MALLOC_ENV),
         "trainer-random": ("Trainer, default sampling", {})}


def one(side: str, n: int, batch_size: int) -> float:
    import transformers

    transformers.logging.set_verbosity_error()
    if side.startswith("carlrar"):
        return carlrar_examples_per_s(n, batch_size, 5e-5)
    return trainer_examples_per_s(n, batch_size, 5e-5, "random" if side == "trainer-random" else "group_by_length")


def part_b(n: int, batch_size: int, rounds: int, with_default: bool, with_malloc: bool):
    import subprocess

    sides = (["carlrar", "trainer"] + (["carlrar-malloc", "trainer-malloc"] if with_malloc else [])
             + (["trainer-random"] if with_default else []))
    speeds = {s: [] for s in sides}
    for r in range(rounds):  # interleaved, so host-load drift hits every side alike
        for side in sides:
            run = subprocess.run([sys.executable, __file__, "--one", side, "--examples", str(n), "--batch-size",
                                  str(batch_size)], env={**os.environ, **SIDES[side][1]}, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{side} failed:\n{run.stderr[-2000:]}")
            speeds[side].append(float(run.stdout.split()[-1]))
            print(f"   round {r + 1}: {SIDES[side][0]:28s} {speeds[side][-1]:7.1f} examples/s", flush=True)
    med = {s: statistics.median(v) for s, v in speeds.items()}
    print(f"B. one epoch of {n:,} SST-2 examples, batch {batch_size}, MiniLM, {torch.get_num_threads()} threads, "
          f"median of {rounds} interleaved rounds (each a fresh process)")
    for s in sides:
        print(f"   {SIDES[s][0]:28s} {med[s]:7.1f} examples/s   (runs: {', '.join(f'{v:.1f}' for v in speeds[s])})")
    print(f"   carlrar / Trainer(group_by_length)         = {med['carlrar'] / med['trainer']:.2f} (target ≥ 1.2)")
    if with_malloc:
        print(f"   with the malloc env on both sides          = {med['carlrar-malloc'] / med['trainer-malloc']:.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--batches", type=int, default=24, help="part A: batches per method per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--examples", type=int, default=4000, help="part B: training examples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds-b", type=int, default=3, help="part B: interleaved rounds (fresh processes)")
    p.add_argument("--trainer-default", action="store_true", help="part B: also time Trainer's default sampling")
    p.add_argument("--malloc-env", action="store_true", help="part B: also time both with glibc keeping freed memory")
    p.add_argument("--one", choices=list(SIDES), help=argparse.SUPPRESS)  # part B's worker: print examples/s
    args = p.parse_args()
    if args.one:
        print(one(args.one, args.examples, args.batch_size))
        return
    if args.part in ("a", "both"):
        part_a(args.batch_size, args.batches, args.rounds)
    if args.part in ("b", "both"):
        part_b(args.examples, args.batch_size, args.rounds_b, args.trainer_default, args.malloc_env)


if __name__ == "__main__":
    main()
