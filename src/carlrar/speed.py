"""Throughput in the log line: examples/s and the fraction of this machine's measured fp32 matmul peak.

nanoGPT prints MFU against a GPU's datasheet peak; a CPU has none worth trusting (here it swings between
≈130 and ≈184 GFLOP/s with host load), so we time a large matmul at start-up with the same thread count.
Only real (non-pad) tokens count as useful work, so padding shows up as a lower fraction.
"""

from __future__ import annotations

import time

import torch

from carlrar.models import train_flops_per_token


def measure_matmul_peak(n: int = 2048, seconds: float = 0.5) -> float:
    """Best fp32 matmul FLOP/s over a short burst (after one warm-up), with torch's current thread count."""
    g = torch.Generator().manual_seed(0)  # own generator: must not move the training RNG (exact resume)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


class ThroughputMeter:
    """Accumulates examples and useful FLOPs between log lines."""

    def __init__(self, config, peak_flops: float):
        self.config, self.peak = config, peak_flops
        self.reset()

    def reset(self):
        self.examples, self.flops, self.start = 0, 0.0, time.perf_counter()

    def add(self, attention_mask: torch.Tensor, passes: float = 1.0) -> float:
        """``passes``: forward+backward passes per example the method ran (FreeLB: n). Returns the batch's FLOPs."""
        lengths = attention_mask.sum(1).tolist()
        flops = passes * sum(L * train_flops_per_token(self.config, L) for L in lengths)
        self.examples += len(lengths)
        self.flops += flops
        return flops

    def read(self) -> tuple[float, float]:
        """(examples/s, fraction of peak) since the last reset."""
        dt = max(time.perf_counter() - self.start, 1e-9)
        # the start-up burst is a lower bound on the peak (a loaded host slows it): a faster stretch raises it, so
        # the fraction never reads above 100 % (it once printed 109 %)
        self.peak = max(self.peak, self.flops / dt) if self.peak else 0.0
        return self.examples / dt, (self.flops / dt) / self.peak if self.peak else 0.0
