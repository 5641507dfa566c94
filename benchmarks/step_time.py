"""Step time of each training method relative to plain fine-tuning, measured side by side in one process.

Same model (MiniLM, or ``--model albert-base-v2-scratch``: ALBERT's geometry, 128-d embeddings, random weights),
same length-grouped SST-2 (GLUE) batches, fused AdamW step included; methods are interleaved round by round so
host-load drift hits all of them alike. Prints the median seconds per step and the ratios. With ``--projection``
it also times, in the same rounds, RAR's vocabulary-wide part alone on the same batches (the tied decoder's
matmul into the vocabulary, the cross-entropy over it and their backward, once per pass) and prints its share of
the RAR step next to RAR's extra time over FreeLB.

    .venv/bin/python benchmarks/step_time.py --batches 12 --rounds 3
    .venv/bin/python benchmarks/step_time.py --variants "freelb n=2,rar n=2" --projection
    .venv/bin/python benchmarks/step_time.py --model albert-base-v2-scratch --variants "freelb n=2,rar n=2" --batches 3
"""

import argparse
import os
from pathlib import Path
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CARLRAR_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from carlrar.data import Collator, EncodedSplit, LengthGroupedBatchSampler, load_dataset, subset  # noqa: E402
from carlrar.methods import METHODS, AdversarialConfig, ContrastiveConfig, Method, ReconstructionConfig  # noqa: E402
from carlrar.objectives import ContrastiveTerm  # noqa: E402
from carlrar.objectives.reconstruction import reconstruction_loss  # noqa: E402
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


def setup(names: list[str], batch_size: int, n_batches: int, subset_size: int = 4000, model_name: str = "minilm"):
    """The model, its methods (sharing one model and one fused AdamW) and ``n_batches`` length-grouped SST-2
    batches spread over an epoch of a seeded ``subset_size`` subset (ALBERT offline: its tokenizer is trained on
    that subset's texts, as ``carlrar train`` does)."""
    ds = load_dataset("sst2")
    split = subset(ds.split("train"), subset_size, 0)
    tok = load_tokenizer(model_name, split.texts)
    data = EncodedSplit(split, tok, 128)
    every = list(LengthGroupedBatchSampler(data.lengths, batch_size, seed=0))
    collate = Collator(tok.pad_token_id)
    batches = [collate([data[i] for i in b]) for b in every[:: max(1, len(every) // n_batches)][:n_batches]]
    torch.manual_seed(0)
    model = load_classifier(model_name, ds.label_names).train()
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


class VocabProjection:
    """RAR's vocabulary-wide part alone, timed like a method on the same batches: per pass, the tied decoder's
    logits at every position (embedding size → vocabulary), L_R's cross-entropy over them, and the backward of both
    (into the states and into a word-embedding-sized gradient that already exists, as FreeLB's lookups make it in
    the real step). Its own copy of the matrix, so the methods' ``zero_grad`` does not reset that gradient."""

    def __init__(self, model, batches: list, passes: int):
        self.weight = model.word_embeddings.weight.detach().clone().requires_grad_()
        self.weight.grad = torch.zeros_like(self.weight)
        self.bias = torch.zeros(self.weight.size(0), requires_grad=True)
        self.states = {id(b): torch.randn(*b["input_ids"].shape, self.weight.size(1), requires_grad=True)
                       for b in batches}
        self.passes = passes

    def training_step(self, model, batch, backward):
        for _ in range(self.passes):
            logits = F.linear(self.states[id(batch)], self.weight, self.bias)
            backward(reconstruction_loss(logits, batch["input_ids"], batch["attention_mask"]))


def time_methods(model, methods: dict, batches: list, opt, rounds: int,
                 cpu: dict | None = None) -> dict[str, list[float]]:
    """Seconds per optimiser step of each method, interleaved round by round so load drift hits all alike; the
    process's CPU seconds per step go into ``cpu`` when given (on a busy host the wall clock also counts the time
    the neighbours hold the cores)."""
    times = {n: [] for n in methods}
    for n, m in methods.items():  # warm-up
        m.training_step(model, batches[0], lambda loss: loss.backward())
        opt.zero_grad()
    for _ in range(rounds):
        for n, m in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for b in batches:
                m.training_step(model, b, lambda loss: loss.backward())
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[n].append((time.perf_counter() - start) / len(batches))
            if cpu is not None:
                cpu.setdefault(n, []).append((time.process_time() - start_cpu) / len(batches))
    return times


def print_projection_share(times: dict, label: str):
    """The vocabulary projection's share of the RAR step and of RAR's extra time over FreeLB."""
    t = {n: statistics.median(v) for n, v in times.items()}
    extra = t["rar n=2"] - t["freelb n=2"]
    print(f"{label}: vocabulary projection {t[PROJECTION]:.3f} s/step = {t[PROJECTION] / t['rar n=2']:.1%} of the "
          f"RAR step; RAR − FreeLB = {extra:.3f} s/step, {t[PROJECTION] / extra:.0%} of it the projection")


PROJECTION = "vocab projection"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=12, help="timed batches per method per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="minilm", choices=["minilm", "albert-base-v2-scratch"])
    p.add_argument("--projection", action="store_true",
                   help="also time RAR's vocabulary projection alone (needs the variants freelb n=2 and rar n=2)")
    args = p.parse_args()
    model, methods, batches, opt = setup(args.variants.split(","), args.batch_size, args.batches,
                                         model_name=args.model)
    if args.projection:
        methods[PROJECTION] = VocabProjection(model, batches, passes=2)
    names, cpu = list(methods), {}
    times = time_methods(model, methods, batches, opt, args.rounds, cpu)
    base, base_cpu = statistics.median(times[names[0]]), statistics.median(cpu[names[0]])
    real = sum(b["attention_mask"].sum().item() for b in batches) / sum(len(b["labels"]) for b in batches)
    print(f"{args.model} · {torch.get_num_threads()} threads · batch {args.batch_size} · {args.batches} "
          f"length-grouped SST-2 batches × {args.rounds} rounds · mean real length {real:.1f}")
    print(f"{'method':16s} {'s/step':>8s} {'× ' + names[0]:>12s} {'CPU s/step':>10s} {'×':>6s}"
          "   built on (wall, CPU)")
    for n in names:
        t, c = statistics.median(times[n]), statistics.median(cpu[n])
        other = RELATIVE_TO.get(n)
        rel = (f"{t / statistics.median(times[other]):.2f}, {c / statistics.median(cpu[other]):.2f} × {other}"
               if other in times else "")
        print(f"{n:16s} {t:8.3f} {t / base:12.2f} {c:10.3f} {c / base_cpu:6.2f}   {rel}")
    if args.projection:
        print_projection_share(times, "wall")
        print_projection_share(cpu, "CPU ")


if __name__ == "__main__":
    main()
