"""k-PGD evaluation time (issue 17 part 6): how far the attack is from the machine's matmul peak, and what freezing
the parameters during the attack buys, measured side by side (interleaved rounds) in one run.

MiniLM on a seeded subset of AG News dev, ε = 0.02 / 0.075 / 0.1, 10 steps, batches of 64 by length (what
``carlrar reproduce`` runs). Useful FLOPs per token and attack step: a forward plus the backward to δ only (no weight
gradients), 2/3 of a training step's 3 × forward; per ε: 10 such steps and one forward; per batch one clean forward.
If the attack already runs at a large share of the peak, no rewrite with identical per-example δ can make it 3 ×
faster; only fewer FLOPs (a different attack) could.

    .venv/bin/python benchmarks/attack_time.py --examples 128 --rounds 2
"""

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CARLRAR_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import torch  # noqa: E402

from carlrar.attack import attack_split  # noqa: E402
from carlrar.data import EncodedSplit, eval_batches, load_dataset, subset  # noqa: E402
from carlrar.models import load_classifier, load_tokenizer, train_flops_per_token  # noqa: E402
from carlrar.speed import measure_matmul_peak  # noqa: E402

EPS, STEPS, BATCH = [0.02, 0.075, 0.1], 10, 64


def useful_flops(model, data: EncodedSplit) -> float:
    """The attack's matmul FLOPs over padded batches as attack_split forms them."""
    total = 0.0
    for idx in eval_batches(data.lengths, BATCH):
        width = max(data.lengths[i] for i in idx)
        forward = train_flops_per_token(model.config, width) / 3 * width * len(idx)
        total += forward * (1 + len(EPS) * (2 * STEPS + 1))
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    ds = load_dataset("agnews")
    tok = load_tokenizer("minilm")
    data = EncodedSplit(subset(ds.split("dev"), args.examples, 0), tok, 128)
    torch.manual_seed(0)
    model = load_classifier("minilm", ds.label_names)
    peak = measure_matmul_peak()
    flops = useful_flops(model, data)

    def run(frozen: bool) -> tuple[float, dict]:
        for q in model.parameters():
            q.requires_grad_(not frozen)
        start = time.perf_counter()
        result = attack_split(model, data, tok.pad_token_id, EPS, STEPS, batch_size=BATCH, progress=False)
        return time.perf_counter() - start, result

    times = {False: [], True: []}
    results = {}
    for _ in range(args.rounds):
        for frozen in (False, True):
            t, results[frozen] = run(frozen)
            times[frozen].append(t)
    same = [a["accuracy"] for a in results[False]["attacks"]] == [a["accuracy"] for a in results[True]["attacks"]]
    print(f"{torch.get_num_threads()} threads · {args.examples} AG News dev examples · ε {EPS} × {STEPS} steps · "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    for frozen, label in ((False, "as shipped (parameters require grad)"), (True, "parameters frozen")):
        t = statistics.median(times[frozen])
        print(f"{label:40s} {t:7.1f} s  {args.examples / t:6.1f} ex/s  {flops / t / 1e9:6.1f} GFLOP/s useful = "
              f"{100 * flops / t / peak:4.1f} % of peak")
    print(f"frozen / shipped time: {statistics.median(times[True]) / statistics.median(times[False]):.2f} · "
          f"identical accuracies: {same} · a 3 × speed-up would need "
          f"{300 * flops / statistics.median(times[False]) / peak:.0f} % of the matmul peak")


if __name__ == "__main__":
    main()
