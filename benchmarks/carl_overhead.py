"""Where CARL's step time goes beyond FreeLB's (issue 17 part 5), measured side by side in one process.

FreeLB n = 2 and CARL n = 2 (banks sized for the full SST-2 train set, m = 16,000 negatives drawn) on the same
MiniLM, batches and fused AdamW, interleaved round by round (``step_time.py``'s setup). Inside CARL's step the
contrastive term's pieces are timed by wrapping them: the clean forward that gives R, the negative draw, L_D's
forward, the Eq. 5 bank update; the rest of the difference is the backward through the clean pass's graph (L_D's
gradient reaches the encoder through R as well as through R^adv, Eq. 2). One FreeLB pass (forward + backward) is
the unit: the algorithm needs one more forward and one more backward of the clean input, so its floor is
1 + 1/n = 1.5 × FreeLB at n = 2 (forward ≈ 1/3 of a pass), or 1 + 2/(3n) ≈ 1.33 × when γ = 0 lets R come from
pass 0 (no extra forward, the extra backward stays).

    .venv/bin/python benchmarks/carl_overhead.py --batches 8 --rounds 3
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from carlrar.objectives import ContrastiveTerm  # noqa: E402
from step_time import setup  # noqa: E402  (MiniLM, SST-2 batches, methods sharing one model)

PIECES = ("pass_loss", "sample", "loss", "update_banks")


def timed(store: dict, key: str, fn):
    """``fn`` that adds its wall time to ``store[key]`` on every call."""
    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            store[key] += time.perf_counter() - start
    return wrapper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    model, methods, batches, opt = setup(["freelb n=2", "carl n=2"], args.batch_size, args.batches)
    term = methods["carl n=2"].term(ContrastiveTerm)
    spent = dict.fromkeys(PIECES, 0.0)
    term.pass_loss = timed(spent, "pass_loss", term.pass_loss)
    term.sampler.sample = timed(spent, "sample", term.sampler.sample)
    term.loss.forward = timed(spent, "loss", term.loss.forward)
    term.update_banks = timed(spent, "update_banks", term.update_banks)

    def run(name) -> float:
        start = time.perf_counter()
        for b in batches:
            methods[name].training_step(model, b, lambda loss: loss.backward())
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / len(batches)

    for name in methods:  # warm-up
        run(name)
    times, pieces = {n: [] for n in methods}, []
    for _ in range(args.rounds):
        times["freelb n=2"].append(run("freelb n=2"))
        spent.update(dict.fromkeys(PIECES, 0.0))
        times["carl n=2"].append(run("carl n=2"))
        pieces.append({k: v / len(batches) for k, v in spent.items()})
    freelb, carl = (statistics.median(times[n]) for n in ("freelb n=2", "carl n=2"))
    each = {k: statistics.median(p[k] for p in pieces) for k in PIECES}
    clean_forward = each["pass_loss"] - each["sample"] - each["loss"]
    backward = carl - freelb - each["pass_loss"] - each["update_banks"]
    unit = freelb / 2  # one FreeLB pass, forward + backward
    print(f"{torch.get_num_threads()} threads · batch {args.batch_size} · {args.batches} SST-2 batches × "
          f"{args.rounds} rounds · m = {term.sampler.m:,} negatives, banks {len(term.bank_orig.rows):,} rows")
    print(f"FreeLB n=2 {1000 * freelb:7.1f} ms/step · CARL n=2 {1000 * carl:7.1f} ms/step · ratio {carl / freelb:.2f} "
          f"(floor 1.50; 1.33 with R from pass 0 at γ = 0)")
    print(f"CARL's extra {1000 * (carl - freelb):6.1f} ms = {(carl - freelb) / unit:.2f} FreeLB passes:")
    for label, t in (("clean forward for R (+ projection, normalise)", clean_forward),
                     ("negative draw (m per example)", each["sample"]), ("L_D forward (bank scores)", each["loss"]),
                     ("Eq. 5 bank update", each["update_banks"]),
                     ("backward through the clean graph + L_D (the rest)", backward)):
        print(f"  {label:52s} {1000 * t:7.1f} ms  {t / unit:5.2f} pass  {100 * t / (carl - freelb):5.1f} %")


if __name__ == "__main__":
    main()
