"""carlrar's FreeLB against its peers' FreeLB loops as published, side by side in one run (issue 17 part 4).

Same model (MiniLM), same seeded 4,000-example SST-2 (GLUE) subset, batch 32, same n; variants interleaved round by
round so host-load drift hits all alike; each step includes gradient clipping (1.0), the optimiser step and the LR
schedule. Prints examples/s of each variant (wall clock, and per CPU-second of this process: on a shared host the
wall clock also counts the time the neighbours hold the cores), the ratios, and where the ratio comes from.

The peers, re-created from the code as read (not copied):

- FreeLB's official Hugging Face example, zhuchen03/FreeLB @ 2100e74, ``huggingface-transformers/examples/
  run_glue_freelb.py`` (``train``, ``load_and_cache_examples``) and its patched ALBERT @ d8c1695
  (``huggingface-transformers/src/transformers/modeling_albert.py``). Features come from
  ``glue_convert_examples_to_features`` padded to ``--max_seq_length`` (128 by default, 512 in its
  ``launch/run_glue.sh``); batches are drawn by ``RandomSampler`` (no length grouping), and then every batch is cut to
  its longest real row ("using adaptive sequence length"): the padding is per random batch, not 128. δ (L2):
  uniform(−1, 1) · mask · γ / sqrt(L · d), L = the row's real tokens; each of the n passes runs the model on
  ``word_embeddings(ids) + δ`` and backpropagates loss / n; between passes δ += α · g / ‖g‖ (per row, over the
  flattened len × d) with ‖δ‖ ≤ ε rescaling when ε > 0, and the embeddings are looked up again; then
  ``clip_grad_norm_(1.0)``, ``transformers.AdamW`` (a per-parameter Python loop; here ``torch.optim.AdamW`` with
  ``foreach=False``: the same per-tensor arithmetic), a linear schedule, ``model.zero_grad()``; fp32 unless --fp16
  (apex). Dropout: the patched ALBERT reuses the *attention-probability* dropout masks over the n passes (its
  launch script sets that dropout to 0 for SST-2), all other dropout is drawn afresh on every pass.
- TextDefender, RockyLzy/TextDefender @ 901977e: ``trainer/freelb.py`` with ``trainer/gradient.py``
  (``delta_initial`` / ``delta_update``: the example's formulas), ``data/reader.py`` (features padded to
  ``max_seq_len``) and ``utils/my_utils.py`` ``collate_fn`` (cut to the batch's longest), ``main.py`` @ cc60d0a
  (shuffled ``DataLoader``, ``torch.optim.AdamW`` non-fused, ``CrossEntropyLoss(reduction='none')`` then the mean,
  the model built with ``output_hidden_states=True``, clip 1.0). Stock Hugging Face model: every dropout mask is
  fresh on every pass. Per step it is the example's algorithm with other calls: ``check`` shows the same
  gradients, and ``--textdefender`` times it as its own variant.

carlrar's ``freelb_step`` runs the same arithmetic (``src/carlrar/perturb.py``); ``check`` below shows it gives the
peers' parameter gradients on the same batch and δ init, padded to the batch's longest or to 128 (padding under the
attention mask does not change them), and bit for bit with dropout on when ``adv_reuse_dropout=False`` (fresh masks,
as TextDefender). Its default, ``adv_reuse_dropout=True``, reuses *every* dropout mask over the passes: neither
peer's choice exactly (the example reuses only the attention-probability masks), a documented difference.

    .venv/bin/python benchmarks/peers.py --batches 4 --rounds 2          # a few minutes on an idle machine
    .venv/bin/python benchmarks/peers.py --textdefender --with-fixed     # + TextDefender, + the example uncut (128)
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
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from carlrar.config import TrainConfig  # noqa: E402
from carlrar.data import Collator, EncodedSplit, LengthGroupedBatchSampler, load_dataset, subset  # noqa: E402
from carlrar.methods import AdversarialConfig, Method, freelb_step  # noqa: E402
from carlrar.models import load_classifier, load_tokenizer  # noqa: E402
from carlrar.speed import measure_matmul_peak  # noqa: E402
from carlrar.train import make_optimizer  # noqa: E402

transformers.logging.set_verbosity_error()
MAX_SEQ_LENGTH = 128  # the example's --max_seq_length default and TextDefender's max_seq_len


# ---- the peers' FreeLB step (L2 norm, their SST-2 setting) ----

def peer_init(embeds: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """δ's start: uniform(−1, 1) on real positions, scaled per row to γ / sqrt(real tokens · d)."""
    if gamma <= 0:
        return torch.zeros_like(embeds)
    real = mask.to(embeds)
    u = torch.zeros_like(embeds).uniform_(-1, 1) * real.unsqueeze(2)
    return (u * (gamma / torch.sqrt(real.sum(1) * embeds.size(-1))).view(-1, 1, 1)).detach()


def peer_ascend(delta: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """δ + α · g / max(‖g‖, 1e-8) per row, then rows with ‖δ‖ > ε scaled back to ε (ε = 0: unbounded)."""
    rows = delta.size(0)
    delta = (delta + alpha * grad / grad.view(rows, -1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)).detach()
    if eps > 0:
        size = delta.view(rows, -1).norm(dim=1)
        over = (size > eps).to(delta)
        delta = (delta * (eps / size * over + 1 - over).view(-1, 1, 1)).detach()
    return delta


def peer_passes(hf, batch: dict, adv: AdversarialConfig, textdefender: bool = False, delta0=None) -> float:
    """The n forward/backward passes of one peer step on ``hf`` (a stock HF classifier); returns the summed loss.
    The example gets its loss from the model (``labels=``); TextDefender asks for the hidden states and takes
    the mean of per-row cross-entropies itself. ``delta0``: δ's start instead of a draw (``check``'s hook)."""
    ids, mask, labels, n = batch["input_ids"], batch["attention_mask"], batch["labels"], adv.adv_steps
    inputs = {"attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    lookup = hf.get_input_embeddings()
    embeds = lookup(ids)
    delta = peer_init(embeds, mask, adv.adv_init_mag) if delta0 is None else delta0
    total = 0.0
    for t in range(n):
        delta.requires_grad_()
        if textdefender:
            logits = hf(inputs_embeds=delta + embeds, output_hidden_states=True, **inputs).logits
            loss = torch.mean(F.cross_entropy(logits, labels, reduction="none")) / n
        else:
            loss = hf(inputs_embeds=delta + embeds, labels=labels, **inputs).loss / n
        total += loss.item()
        loss.backward()
        if t == n - 1:
            break
        delta = peer_ascend(delta, delta.grad.clone().detach(), adv.adv_lr, adv.adv_max_norm)
        embeds = lookup(ids)  # looked up again: the embedding matrix gets a gradient from every pass
    return total


def peer_optimizer(hf, lr: float, total_steps: int):
    """Their AdamW: decay groups by name, eps 1e-8, one tensor at a time (not fused); linear schedule."""
    no_decay = ("bias", "LayerNorm.weight")
    decays = lambda name: not any(k in name for k in no_decay)  # noqa: E731
    groups = [{"params": [p for n, p in hf.named_parameters() if decays(n)], "weight_decay": 0.0},
              {"params": [p for n, p in hf.named_parameters() if not decays(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, eps=1e-8, foreach=False, fused=False)
    return opt, get_linear_schedule_with_warmup(opt, 0, total_steps)


# ---- batches as each side draws them ----

def peer_batches(data: EncodedSplit, batch_size: int, pad_token_id: int, seed: int, cut: bool = True) -> list[dict]:
    """An epoch as the peers draw it: rows padded to 128, random order, each batch cut to its longest row
    (``cut=False``: left at 128, what the issue assumed the example does)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for s in range(0, len(order), batch_size):
        b = fixed_width(Collator(pad_token_id)([data[i] for i in order[s:s + batch_size]]), MAX_SEQ_LENGTH,
                        pad_token_id)
        width = int(b["attention_mask"].sum(1).max()) if cut else MAX_SEQ_LENGTH
        out.append({k: v[:, :width] if v.dim() == 2 else v for k, v in b.items()})
    return out


def carlrar_batches(data: EncodedSplit, batch_size: int, pad_token_id: int, seed: int) -> list[dict]:
    """An epoch as carlrar trains by default: length-grouped batches, each padded to its longest row."""
    collate = Collator(pad_token_id)
    return [collate([data[i] for i in b]) for b in LengthGroupedBatchSampler(data.lengths, batch_size, seed=seed)]


def fixed_width(batch: dict, width: int, pad_token_id: int) -> dict:
    """``batch`` right-padded to ``width`` columns (ids with the pad id, mask with 0)."""
    extra = width - batch["input_ids"].size(1)
    return {**batch, "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_token_id),
            "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0)}


def spread(batches: list[dict], k: int) -> list[dict]:
    """k batches standing for the epoch: the batches sorted by width cut into k equal strata, from each the batch
    closest to its stratum's mean size, so the mean computed tokens per example stay within a few % of the epoch's
    (a stratum's median misses the long tail of the length-grouped widths: 8 % short at k = 3)."""
    ranked = sorted(batches, key=lambda b: b["input_ids"].size(1))
    picked = []
    for i in range(k):
        stratum = ranked[i * len(ranked) // k:(i + 1) * len(ranked) // k]
        mean = sum(b["input_ids"].numel() for b in stratum) / len(stratum)
        picked.append(min(stratum, key=lambda b: abs(b["input_ids"].numel() - mean)))
    return picked


def tokens(batches: list[dict]) -> tuple[float, float]:
    """(real, computed) tokens per example over ``batches``."""
    rows = sum(b["input_ids"].size(0) for b in batches)
    return (sum(int(b["attention_mask"].sum()) for b in batches) / rows,
            sum(b["input_ids"].numel() for b in batches) / rows)


# ---- same per-step semantics ----

def grads_of(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def largest_difference(a: dict, b: dict) -> float:
    """max |a − b| / max |a| over all parameter gradients (the same parameters must have one)."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:3]
    scale = max(float(g.abs().max()) for g in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def check(model, batch: dict, adv: AdversarialConfig, pad_token_id: int, seed: int = 0) -> dict[str, float]:
    """Largest relative parameter-gradient difference between a peer step and carlrar's ``freelb_step`` from the
    same RNG state. ``padding``: dropout off, carlrar's batch padded to 128, the peer's cut to its longest row and
    starting from the δ carlrar draws (a draw depends on the tensor's width, the values on real positions must
    match). ``dropout``: the model's dropout on, same shapes, carlrar drawing fresh masks. ``textdefender``:
    TextDefender's calls against the example's."""
    was_training, out = model.training, {}
    fresh = AdversarialConfig(**{**vars(adv), "adv_reuse_dropout": False})
    wide = fixed_width(batch, MAX_SEQ_LENGTH, pad_token_id)
    torch.manual_seed(seed)
    start = peer_init(model.embed(wide["input_ids"]).detach(), wide["attention_mask"], adv.adv_init_mag)
    for name, train_mode, ours, textdefender, delta0 in (
            ("padding", False, wide, False, start[:, :batch["input_ids"].size(1)]),
            ("dropout", True, batch, False, None),
            ("textdefender", True, None, True, None)):
        model.train(train_mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        peer_passes(model.hf, batch, adv, textdefender, delta0)
        theirs = grads_of(model)
        torch.manual_seed(seed)
        if ours is None:  # the example itself as the reference
            peer_passes(model.hf, batch, adv)
        else:
            freelb_step(model, ours, lambda loss: loss.backward(), fresh)
        out[name] = largest_difference(theirs, grads_of(model))
    model.train(was_training)
    return out


# ---- timing ----

class Side:
    """One timed variant: its batches and a function running one whole optimiser step on a batch."""

    def __init__(self, label: str, batches: list[dict], step):
        self.label, self.batches, self.step = label, batches, step
        self.wall, self.cpu = [], []

    def run(self):
        wall, cpu = time.perf_counter(), time.process_time()
        for b in self.batches:
            self.step(b)
        rows = sum(len(b["labels"]) for b in self.batches)
        self.wall.append(rows / (time.perf_counter() - wall))
        self.cpu.append(rows / (time.process_time() - cpu))


def peer_step(model, opt, sched, adv, textdefender=False):
    def step(batch):
        peer_passes(model.hf, batch, adv, textdefender)
        torch.nn.utils.clip_grad_norm_(model.hf.parameters(), 1.0)
        opt.step()
        sched.step()
        model.hf.zero_grad()
    return step


def carlrar_step(model, opt, sched, method):
    def step(batch):  # as carlrar.train's loop: clip (its norm is read), fused AdamW, schedule, zero to None
        method.training_step(model, batch, lambda loss: loss.backward())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return step


def optimizer_seconds(model, optimizers: dict, repeats: int = 3) -> dict[str, float]:
    """Seconds per ``step()`` of each optimiser alone (best of ``repeats``), on zero gradients of the model's
    shapes: the part of the loop factor that is the optimiser."""
    out = {}
    for name, opt in optimizers.items():
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            opt.step()
            best = min(best, time.process_time() - start)
        out[name] = best
    model.zero_grad(set_to_none=True)
    return out


def setup(args):
    ds = load_dataset("sst2")
    tok = load_tokenizer("minilm")
    data = EncodedSplit(subset(ds.split("train"), args.examples, 0), tok, MAX_SEQ_LENGTH)
    pad = tok.pad_token_id
    epochs = {"random": peer_batches(data, args.batch_size, pad, args.seed),
              "grouped": carlrar_batches(data, args.batch_size, pad, args.seed)}
    if args.with_fixed:
        epochs["fixed"] = peer_batches(data, args.batch_size, pad, args.seed, cut=False)
    torch.manual_seed(0)
    model = load_classifier("minilm", ds.label_names).train()
    adv = AdversarialConfig(adv_steps=args.adv_steps)  # the paper's SST-2 γ, α, ε (Table 1)
    total = 10**6  # a long schedule: the learning rate does not reach 0 while timing
    opt, sched = peer_optimizer(model.hf, 1e-5, total)
    ours, our_sched = make_optimizer(model, TrainConfig(dataset="sst2", lr=1e-5), total)
    method = Method("freelb", adv, model=model, total_steps=total)
    k = args.batches
    sides = [Side("FreeLB example (random, cut)", spread(epochs["random"], k), peer_step(model, opt, sched, adv)),
             Side("carlrar step, example's batches", spread(epochs["random"], k),
                  carlrar_step(model, ours, our_sched, method)),
             Side("carlrar (length-grouped)", spread(epochs["grouped"], k),
                  carlrar_step(model, ours, our_sched, method))]
    if args.textdefender:  # the example's step with other calls: timed only on request
        sides.insert(1, Side("TextDefender (random, cut)", spread(epochs["random"], k),
                             peer_step(model, opt, sched, adv, textdefender=True)))
    if args.with_fixed:
        sides.insert(0, Side("FreeLB example, fixed 128", spread(epochs["fixed"], args.fixed_batches),
                             peer_step(model, opt, sched, adv)))
    return model, adv, pad, epochs, sides, {"AdamW per tensor (peers)": opt, "fused AdamW (carlrar)": ours}


def report(sides: list, epochs: dict, adv, checks: dict, peaks: tuple, threads: int):
    batch = len(sides[-1].batches[0]["labels"])
    print(f"{threads} thread(s) · MiniLM · batch {batch} · FreeLB n = {adv.adv_steps} · "
          f"median of {len(sides[0].wall)} interleaved rounds · fp32 matmul peak {peaks[0] / 1e9:.0f} / "
          f"{peaks[1] / 1e9:.0f} GFLOP/s (start / end)")
    print(f"{'variant':34s} {'batches':>7s} {'ex/s':>7s} {'ex/CPU-s':>9s} {'real tok':>8s} {'computed':>8s}")
    for s in sides:
        real, computed = tokens(s.batches)
        print(f"{s.label:34s} {len(s.batches):7d} {statistics.median(s.wall):7.2f} {statistics.median(s.cpu):9.2f} "
              f"{real:8.1f} {computed:8.1f}")
    med = {s.label: (statistics.median(s.wall), statistics.median(s.cpu)) for s in sides}
    ours = med["carlrar (length-grouped)"]
    for peer in [label for label in med if not label.startswith("carlrar")]:
        print(f"carlrar / {peer:31s} = {ours[0] / med[peer][0]:.2f} (wall)  {ours[1] / med[peer][1]:.2f} (CPU)"
              + ("   goal ≥ 3" if peer.startswith("FreeLB example (") else ""))
    same = med["carlrar step, example's batches"]
    example = med["FreeLB example (random, cut)"]
    print(f"  = loop and optimiser on the same batches {same[0] / example[0]:.2f} (wall) {same[1] / example[1]:.2f} "
          f"(CPU) × batching {ours[0] / same[0]:.2f} (wall) {ours[1] / same[1]:.2f} (CPU)")
    for name, batches in epochs.items():
        real, computed = tokens(batches)
        print(f"whole epoch, {name:8s}: {real:.1f} real / {computed:.1f} computed tokens per example "
              f"({computed / real:.2f} ×)")
    print("same per-step semantics, largest |Δ grad| / max |grad| against the FreeLB example: "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=4, help="timed batches per variant per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--adv-steps", type=int, default=2, help="FreeLB's n")
    p.add_argument("--examples", type=int, default=4000, help="seeded SST-2 training subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--textdefender", action="store_true",
                   help="also time TextDefender's step (the example's algorithm)")
    p.add_argument("--with-fixed", action="store_true", help="also the example with no cut (every batch 128 wide)")
    p.add_argument("--fixed-batches", type=int, default=1, help="timed fixed-128 batches per round (slow)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_start = measure_matmul_peak()
    model, adv, pad, epochs, sides, optimizers = setup(args)
    narrowest = min(epochs["random"], key=lambda b: b["input_ids"].size(1))  # the cheapest to check and warm up on
    checks = check(model, narrowest, adv, pad)
    for s in sides:  # warm-up: first-call allocations and optimiser state out of the timing
        s.step(narrowest)
    for _ in range(args.rounds):
        for s in sides:
            s.run()
            print(f"  {s.label:34s} {s.wall[-1]:7.2f} ex/s  {s.cpu[-1]:7.2f} ex/CPU-s", flush=True)
    report(sides, epochs, adv, checks, (peak_start, measure_matmul_peak()), torch.get_num_threads())
    print("optimiser step alone, CPU s: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                      optimizer_seconds(model, optimizers).items()))


if __name__ == "__main__":
    main()
