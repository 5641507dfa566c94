"""Training throughput (examples/s) on 2 CPU threads, printed from one run.

A. base, freelb, carl, rar, carl-rar in one process on the same length-grouped SST-2 batches (optimiser step
   included; CARL's banks sized for full SST-2 and marked filled), ratios to base and to FreeLB.
B. carlrar's training loop (``carlrar.train.train``, method base) vs ``transformers.Trainer`` with
   ``train_sampling_strategy="group_by_length"`` (its fastest setting here) on the same model (MiniLM), the same
   4,000 SST-2 examples, batch 32, one epoch, fused AdamW both. Target: carlrar ≥ 1.2 × Trainer.

    .venv/bin/python benchmarks/throughput.py            # both parts, about 8 minutes
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


def part_b(n: int, batch_size: int, with_default: bool):
    import transformers

    transformers.logging.set_verbosity_error()
    lr = 5e-5
    ours = carlrar_examples_per_s(n, batch_size, lr)
    theirs = trainer_examples_per_s(n, batch_size, lr, "group_by_length")
    print(f"B. one epoch of {n:,} SST-2 examples, batch {batch_size}, MiniLM, {torch.get_num_threads()} threads")
    print(f"   carlrar train (base)                  {ours:7.1f} examples/s")
    print(f"   Trainer, group_by_length              {theirs:7.1f} examples/s")
    if with_default:
        print(f"   Trainer, default sampling             {trainer_examples_per_s(n, batch_size, lr, 'random'):7.1f}"
              " examples/s")
    print(f"   carlrar / Trainer(group_by_length) = {ours / theirs:.2f} (target ≥ 1.2)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--batches", type=int, default=24, help="part A: batches per method per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--examples", type=int, default=4000, help="part B: training examples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--trainer-default", action="store_true", help="part B: also time Trainer's default sampling")
    args = p.parse_args()
    if args.part in ("a", "both"):
        part_a(args.batch_size, args.batches, args.rounds)
    if args.part in ("b", "both"):
        part_b(args.examples, args.batch_size, args.trainer_default)


if __name__ == "__main__":
    main()
