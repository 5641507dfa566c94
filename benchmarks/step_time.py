"""Step time of each training method relative to plain fine-tuning, measured side by side in one process.

Same model (MiniLM), same length-grouped SST-2 (GLUE) batches, fused AdamW step included; methods are interleaved
round by round so host-load drift hits all of them alike. Prints the median seconds per step and the ratios.

    .venv/bin/python benchmarks/step_time.py --batches 12 --rounds 3
"""

import argparse
import os
from pathlib import Path
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CARLRAR_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import torch  # noqa: E402
import transformers  # noqa: E402

from carlrar.data import Collator, EncodedSplit, LengthGroupedBatchSampler, load_dataset, subset  # noqa: E402
from carlrar.methods import METHODS, AdversarialConfig, ContrastiveConfig, Method, ReconstructionConfig  # noqa: E402
from carlrar.objectives import ContrastiveTerm  # noqa: E402
from carlrar.models import load_classifier, load_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

VARIANTS = {  # name → (method, *configs); no configs → the method's defaults
    "base": ("base",),
    "freelb n=2": ("freelb", AdversarialConfig(adv_steps=2)),
    "freelb n=3": ("freelb", AdversarialConfig(adv_steps=3)),
    "carl n=2": ("carl", AdversarialConfig(adv_steps=2), ContrastiveConfig(carl_start_step=0)),
    "rar n=2": ("rar", AdversarialConfig(adv_steps=2), ReconstructionConfig()),
    "rar n=2 last": ("rar", AdversarialConfig(adv_steps=2), ReconstructionConfig(rar_passes="last")),
    "carl-rar n=2": ("carl-rar", AdversarialConfig(adv_steps=2), ContrastiveConfig(carl_start_step=0),
                     ReconstructionConfig()),
}
# extra ratio column: the method each one is built on
RELATIVE_TO = {"carl n=2": "freelb n=2", "rar n=2": "freelb n=2", "rar n=2 last": "freelb n=2",
               "carl-rar n=2": "freelb n=2"}


def setup(names: list[str], batch_size: int, n_batches: int, subset_size: int = 4000):
    """MiniLM, its methods (sharing one model and one fused AdamW) and ``n_batches`` length-grouped SST-2 batches
    spread over an epoch of a seeded ``subset_size`` subset."""
    ds = load_dataset("sst2")
    tok = load_tokenizer("minilm")
    data = EncodedSplit(subset(ds.split("train"), subset_size, 0), tok, 128)
    every = list(LengthGroupedBatchSampler(data.lengths, batch_size, seed=0))
    collate = Collator(tok.pad_token_id)
    batches = [collate([data[i] for i in b]) for b in every[:: max(1, len(every) // n_batches)][:n_batches]]
    torch.manual_seed(0)
    model = load_classifier("minilm", ds.label_names).train()
    methods = {}
    for n in names:  # (RAR adds its head to the model here, before the optimiser sees the parameters)
        configs = VARIANTS[n][1:] or [c() for c in METHODS[VARIANTS[n][0]].config_classes]
        # CARL: banks sized for the full SST-2 train set, so m = 16,000 negatives are really drawn; their
        # content does not change the cost, so skip the fill pass and mark them filled
        methods[n] = Method(VARIANTS[n][0], *configs, model=model, train_labels=ds.split("train").labels,
                            total_steps=1)
        if methods[n].term(ContrastiveTerm) is not None:
            methods[n].term(ContrastiveTerm).filled = True
    return model, methods, batches, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def time_methods(model, methods: dict, batches: list, opt, rounds: int) -> dict[str, list[float]]:
    """Seconds per optimiser step of each method, interleaved round by round so load drift hits all alike."""
    times = {n: [] for n in methods}
    for n, m in methods.items():  # warm-up
        m.training_step(model, batches[0], lambda loss: loss.backward())
        opt.zero_grad()
    for _ in range(rounds):
        for n, m in methods.items():
            start = time.perf_counter()
            for b in batches:
                m.training_step(model, b, lambda loss: loss.backward())
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[n].append((time.perf_counter() - start) / len(batches))
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=12, help="timed batches per method per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    model, methods, batches, opt = setup(args.variants.split(","), args.batch_size, args.batches)
    names = list(methods)
    times = time_methods(model, methods, batches, opt, args.rounds)
    base = statistics.median(times[names[0]])
    print(f"{torch.get_num_threads()} threads · batch {args.batch_size} · {args.batches} length-grouped SST-2 batches "
          f"× {args.rounds} rounds · mean real length {sum(b['attention_mask'].sum().item() for b in batches) / sum(len(b['labels']) for b in batches):.1f}")
    print(f"{'method':14s} {'s/step':>8s} {'× ' + names[0]:>10s}   built on")
    for n in names:
        t = statistics.median(times[n])
        other = RELATIVE_TO.get(n)
        rel = f"{t / statistics.median(times[other]):.2f} × {other}" if other in times else ""
        print(f"{n:14s} {t:8.3f} {t / base:10.2f}   {rel}")


if __name__ == "__main__":
    main()
