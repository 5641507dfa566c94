"""CARL memory-bank footprint: two banks of N × d rows (B_orig, B_adv), fp32 or fp16 storage.

Allocates the banks for real where they fit comfortably (checks 2·N·d·bytes against the tensors' nbytes), and
prints the formula for the rest.

    .venv/bin/python benchmarks/memory_bank.py
"""

import torch

from carlrar.objectives import MemoryBank

ALLOCATE_UP_TO = 2 * 2**30  # bytes per bank


def main():
    print(f"{'N':>10s} {'d':>5s} {'dtype':>8s} {'2 banks':>10s}  measured")
    for n in (67_349, 2_000_000):
        for d in (384, 768):
            for dtype, size in ((torch.float32, 4), (torch.float16, 2)):
                formula = 2 * n * d * size
                measured = "-"
                if formula / 2 <= ALLOCATE_UP_TO:
                    banks = [MemoryBank(n, d, dtype=dtype) for _ in range(2)]
                    measured = sum(b.rows.nbytes for b in banks)
                    assert measured == formula
                    measured = f"{measured / 2**20:,.1f} MiB"
                    del banks
                print(f"{n:>10,d} {d:>5d} {str(dtype)[6:]:>8s} {formula / 2**20:>8,.1f} MiB  {measured}")


if __name__ == "__main__":
    main()
