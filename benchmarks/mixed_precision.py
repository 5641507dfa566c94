"""Step time with bf16 autocast (``--mixed_precision bf16``) against float32, side by side in one process.

The same model, batches and FreeLB step (n = 2, fused AdamW step included), the two precisions interleaved round by
round so host-load drift hits both alike. ``--model tiny``: the self-check's 2-layer, hidden-32 BERT on its toy
corpus (seconds); ``--model minilm``: MiniLM on length-grouped SST-2 batches (as benchmarks/step_time.py).

    .venv/bin/python benchmarks/mixed_precision.py --model minilm --batches 2 --rounds 2
"""

import argparse
import contextlib
import statistics
import time

import torch

from carlrar.data import Collator
from carlrar.methods import AdversarialConfig, Method


def tiny(batch_size: int, n_batches: int):
    from carlrar.selfcheck import batches, tiny_classifier, toy_data

    tokenizer, data = toy_data()
    draw = batches(data, Collator(tokenizer.pad_token_id), torch.device("cpu"), 0)
    return tiny_classifier(tokenizer, 0).train(), [next(draw) for _ in range(n_batches)]


def minilm(batch_size: int, n_batches: int):
    from step_time import setup

    model, _, batches, _ = setup([], batch_size, n_batches)
    return model, batches


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    model, batches = (tiny if args.model == "tiny" else minilm)(args.batch_size, args.batches)
    method = Method("freelb", AdversarialConfig(adv_steps=2), model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    precisions = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    times, losses = {k: [] for k in precisions}, {k: [] for k in precisions}
    for r in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, autocast in precisions.items():
            start = time.perf_counter()
            for b in batches:
                with autocast():
                    logs = method.training_step(model, b, lambda loss: loss.backward())
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses[name].append(logs["loss"])
            times[name].append((time.perf_counter() - start) / len(batches))
    fp32, bf16 = (statistics.median(times[k][1:]) for k in precisions)
    print(f"{args.model}, FreeLB n = 2, batch {len(batches[0]['labels'])}, {torch.get_num_threads()} thread(s), "
          f"{args.batches} batches × {args.rounds} rounds")
    print(f"fp32 {fp32:.4f} s/step · bf16 {bf16:.4f} s/step · bf16 / fp32 = {bf16 / fp32:.2f}")
    print(f"losses finite: fp32 {all(map(torch.isfinite, map(torch.tensor, losses['fp32'])))}, "
          f"bf16 {all(map(torch.isfinite, map(torch.tensor, losses['bf16'])))}")


if __name__ == "__main__":
    main()
