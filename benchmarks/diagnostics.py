"""Cost of the gradient diagnostics (``--diagnostics_steps K``), measured side by side in one process.

A diagnostic step takes each term's gradient of FreeLB's last pass separately (one extra backward per term); the
other K − 1 steps cost nothing extra. Prints the median step time with and without, interleaved round by round,
and the amortised overhead at K = 10, 25, 50 (target: ≤ 5 % at the default K = 25).

    .venv/bin/python benchmarks/diagnostics.py --batches 8 --rounds 3
"""

import argparse
import statistics
import time

from step_time import setup  # noqa: E402  (same model, batches and filled banks as benchmarks/step_time.py)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="carl-rar n=2,carl n=2,freelb n=2")
    args = p.parse_args()
    model, methods, batches, opt = setup(args.variants.split(","), 32, args.batches)
    times = {(n, d): [] for n in methods for d in (False, True)}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for (n, diagnose), ts in times.items():
            start = time.perf_counter()
            for b in batches:
                methods[n].training_step(model, b, lambda loss: loss.backward(), diagnose=diagnose)
                opt.step()
                opt.zero_grad(set_to_none=True)
            ts.append((time.perf_counter() - start) / len(batches))
    print(f"{'method':14s} {'s/step':>8s} {'diagnostic':>11s} {'× step':>7s}   amortised overhead at K = 10 / 25 / 50")
    for n in methods:
        plain, diag = (statistics.median(times[(n, d)][1:]) for d in (False, True))
        extra = diag / plain - 1
        print(f"{n:14s} {plain:8.3f} {diag:11.3f} {diag / plain:7.2f}   "
              + " / ".join(f"{extra / k:.1%}" for k in (10, 25, 50)))


if __name__ == "__main__":
    main()
