"""The training loop: read ``_train`` top to bottom. Methods plug in through ``carlrar.methods.Method`` (a step
function and its objective terms); the loop owns the data order, the update, evaluation and checkpoints.
The output directory's layout, checkpoints and resume are in ``carlrar.checkpoint``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from carlrar.checkpoint import claim_output_dir, init_from_run, resume, save_best, save_checkpoint
from carlrar.config import TrainConfig, to_dict
from carlrar.data import Collator, EncodedSplit, LengthGroupedBatchSampler, carve_validation, load_dataset, subset
from carlrar.distributed import (any_process, average_gradients, broadcast_object, broadcast_parameters,
                                  make_accelerator, total_rows)
from carlrar.errors import UserError
from carlrar.evaluate import evaluate_split
from carlrar.methods import METHODS, Method
from carlrar.models import check_max_length, count_parameters, load_classifier, load_tokenizer
from carlrar.ownership import json_text, locked, write_whole
from carlrar.speed import ThroughputMeter, measure_matmul_peak


def train(cfg: TrainConfig, *method_configs, on_evaluate=None) -> dict:
    """Train ``cfg.method`` with its config dataclasses (``METHODS[...].config_classes``; defaults when omitted).
    ``on_evaluate(step, dev_accuracy)`` is called after each dev evaluation and checkpoint (e.g. to prune a search
    trial by raising). The output directory's lock is released however training ends: the search goes on."""
    with locked(cfg.resolved_output_dir(), take=False):  # taken by claim_output_dir, on the main process
        return _train(cfg, method_configs, on_evaluate)


def _train(cfg: TrainConfig, method_configs: tuple, on_evaluate) -> dict:
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r} (known: {', '.join(METHODS)})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Everything that can fail on bad input happens before the output directory is touched.
    ds, train_split, val_split = load_splits(cfg)
    tokenizer = load_tokenizer(cfg.model, train_split.texts, cfg.trust_remote_code)
    set_seed(cfg.seed)
    model = load_classifier(cfg.model, ds.label_names, cfg.trust_remote_code)
    check_max_length(model, tokenizer, cfg.max_length)
    accelerator = make_accelerator(cfg.mixed_precision)
    device, main, processes = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    method_configs = method_configs or tuple(c() for c in METHODS[cfg.method].config_classes)
    out, config = cfg.resolved_output_dir(), {**to_dict(cfg, *method_configs), "label_names": ds.label_names}
    resuming = claim_output_dir(out, config, main)

    train_data = EncodedSplit(train_split, tokenizer, cfg.max_length)
    dev_data = EncodedSplit(ds.split("dev"), tokenizer, cfg.max_length)
    sampler = LengthGroupedBatchSampler(train_data.lengths, cfg.batch_size * processes, cfg.seed,
                                        cfg.group_by_length, rank=accelerator.process_index, num_replicas=processes)
    collate = Collator(tokenizer.pad_token_id)
    # own generator: each new iterator draws a seed, which must not move the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(train_data, batch_sampler=sampler, collate_fn=collate,
                                         generator=torch.Generator())
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    model = model.to(device)
    # before the optimiser: a method's terms may add heads to the model (RAR's reconstructor, CARL's projection)
    method = Method(cfg.method, *method_configs, model=model, train_labels=train_data.labels,
                    total_steps=total_steps, train_config=cfg)
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    broadcast_parameters(model)  # no DistributedDataParallel: gradients are averaged once per step (distributed.py)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    run = Run(cfg, accelerator, model, method, tokenizer, ds, dev_data, out, total_steps, steps_per_epoch,
              say=(lambda msg: tqdm.write(msg, file=sys.stderr)) if main else (lambda msg: None),
              on_evaluate=on_evaluate, val_data=EncodedSplit(val_split, tokenizer, cfg.max_length) if val_split else None)
    state = run.state = start_state(run, resuming, config, optimizer)
    meter = ThroughputMeter(model.config, measure_matmul_peak())
    run.say(f"{cfg.method} · {cfg.model} ({count_parameters(model):,} parameters) · {ds.name} train "
            f"{len(train_data):,} / dev {len(dev_data):,} · {total_steps} steps of "
            f"{cfg.batch_size * cfg.grad_accum * processes} · {torch.get_num_threads()} threads, matmul peak "
            f"{meter.peak / 1e9:.0f} GFLOP/s")

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not (main and sys.stderr.isatty()),
               dynamic_ncols=True)
    since: dict[str, list[float]] = {}  # training scalars since the last evaluation
    window: dict[str, list[float]] = {}  # ... since the last log line
    started = time.perf_counter()
    while state["step"] < total_steps:
        if state["batches_done"] >= len(sampler):  # resumed from a checkpoint taken on an epoch's last batch
            state["epoch"], state["batches_done"] = state["epoch"] + 1, 0
        sampler.set_epoch(state["epoch"])
        sampler.start = state["batches_done"]
        micro, evaluated, nonfinite, diagnostics = 0, False, [], {}
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.autocast():  # --mixed_precision: the bank fill's and warm-up's passes too
                changed = micro % cfg.grad_accum == 0 and method.before_step(state["step"], model, train_data, collate,
                                                                          cfg.eval_batch_size)
            if changed:
                save_checkpoint(accelerator, out, model, method, state)  # e.g. CARL's filled banks: not refilled
                meter.reset()
            rows, scale = len(batch["labels"]), 1.0 / cfg.grad_accum
            if processes > 1:  # unequal slices of a global batch: weight by rows, as one process would
                scale *= rows * processes / total_rows(rows)
            diagnose = bool(cfg.diagnostics_steps) and state["step"] % cfg.diagnostics_steps == 0 \
                and micro % cfg.grad_accum == 0
            with accelerator.autocast():  # a no-op without --mixed_precision
                logs = method.training_step(model, batch, accelerator.backward, scale, state["step"], diagnose=diagnose)
            diagnostics = {k[5:]: logs.pop(k) for k in [k for k in logs if k.startswith("diag/")]} or diagnostics
            state["useful_flops"] += meter.add(batch["attention_mask"], method.passes) * processes
            nonfinite += [k for k, v in logs.items() if not math.isfinite(v)]
            for k, v in logs.items():
                since.setdefault(k, []).append(v)
                window.setdefault(k, []).append(v)
            micro += 1
            state["batches_done"] += 1
            state["examples_seen"] += rows * processes
            if micro % cfg.grad_accum != 0 and state["batches_done"] != len(sampler):
                continue  # accumulate: no update until the last micro-batch of the step (or of the epoch)
            average_gradients(model)  # over processes, once per optimiser step, whatever the passes and micro-batches
            # the norm is needed anyway to catch a non-finite gradient; inf max-norm clips nothing
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # fp16: an overflowing gradient is the scaler's to handle (it skips the update and lowers the scale)
            bad_gradient = not torch.isfinite(norm) and accelerator.scaler is None
            if skip_nonfinite(run, nonfinite + (["gradient"] if bad_gradient else [])):
                optimizer.zero_grad(set_to_none=True)  # skipped: no update from this batch
            record_clipping(run, norm.item(), diagnostics, since)
            nonfinite, diagnostics = [], {}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            evaluated = False
            bar.update(1)
            if state["step"] % cfg.log_steps == 0 or state["step"] == total_steps:
                log_line(run, window, meter, scheduler.get_last_lr()[0])
            if cfg.eval_steps and state["step"] % cfg.eval_steps == 0:
                state["train_seconds"] += time.perf_counter() - started
                evaluate_and_checkpoint(run, since)
                started, evaluated = time.perf_counter(), True
                meter.reset()
            if state["step"] >= total_steps:
                break
        else:  # epoch finished
            state["epoch"], state["batches_done"] = state["epoch"] + 1, 0
        if not evaluated:
            state["train_seconds"] += time.perf_counter() - started
            evaluate_and_checkpoint(run, since)
            started = time.perf_counter()
    bar.close()
    return finish(run, len(train_data), meter.peak)


def load_splits(cfg: TrainConfig):
    """The dataset, the training split (without the validation examples, then ``--train_subset``) and the
    validation split (None without ``--validation_size``)."""
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_file, cfg.dev_file, cfg.test_file,
                      cfg.text_column, cfg.label_column)
    val_split, train_split = None, ds.split("train")
    if cfg.validation_size:  # choices on validation, carved before the subset: the same examples for every seed
        val_split, train_split = carve_validation(train_split, cfg.validation_size)
    return ds, subset(train_split, cfg.train_subset, cfg.seed), val_split


@dataclass
class Run:
    """One training run's pieces, shared by the loop's helpers below."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    method: Method
    tokenizer: object
    ds: object
    dev_data: EncodedSplit
    out: Path
    total_steps: int
    steps_per_epoch: int
    say: Callable[[str], None]
    on_evaluate: Callable[[int, float], None] | None = None
    val_data: EncodedSplit | None = None  # the selection split, when carved from the training data
    state: dict = field(default_factory=dict)

    def __post_init__(self):
        self.state = {"step": 0, "epoch": 0, "batches_done": 0, "best_accuracy": -1.0, "best_step": None,
                      "best_dev": None, "train_seconds": 0.0, "examples_seen": 0, "useful_flops": 0.0,
                      "skipped_steps": 0, "num_processes": self.accelerator.num_processes}


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """Fused AdamW (no weight decay on biases and LayerNorm) and linear warm-up then linear decay to 0."""
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n  # noqa: E731
    groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    warmup = int(cfg.warmup_ratio * total_steps)
    if cfg.lr_schedule == "constant":  # e.g. a trunk whose branches continue at the same rate
        return optimizer, get_constant_schedule_with_warmup(optimizer, warmup)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def skip_nonfinite(run: Run, nonfinite: list[str]) -> bool:
    """The one decision on a non-finite loss or gradient, taken alike on every process: stop with a one-line error
    naming the step and the terms, or (``--skip_nonfinite``) count the step and tell the caller to skip it."""
    if any_process(bool(nonfinite)) and not nonfinite:
        nonfinite = ["loss on another process"]
    if not nonfinite:
        return False
    state, what = run.state, ", ".join(dict.fromkeys(nonfinite))
    if not run.cfg.skip_nonfinite:
        raise UserError(f"non-finite {what} at step {state['step']} (epoch {state['epoch']}); lower --lr or "
                        "--adv_lr, set --adv_start_step, or pass --skip_nonfinite to skip such steps")
    state["skipped_steps"] += 1
    run.say(f"step {state['step']}: non-finite {what}, step skipped ({state['skipped_steps']} so far)")
    return True


def start_state(run: Run, resuming: bool, config: dict, optimizer) -> dict:
    """The loop's state: fresh, resumed from this run's checkpoint, or continued from another run's
    (``--init_from``)."""
    cfg, state = run.cfg, run.state
    if resuming:
        state = resume(run.accelerator, run.out, run.model, run.method, state)
        run.say(f"resuming {run.out} from step {state['step']} (epoch {state['epoch']}, batch {state['batches_done']})")
    elif cfg.init_from:
        state = init_from_run(run.accelerator, Path(cfg.init_from), config, run.model, optimizer, state,
                              cfg.init_weights_only)
        run.say(f"starting from {cfg.init_from} at step {state['step']}")
    return state


def record_clipping(run: Run, norm: float, diagnostics: dict, since: dict[str, list[float]]):
    """The gradient norm before clipping and the clip factor, into the evaluation's means; on a diagnostic step,
    with the per-term gradient diagnostics (carlrar.diagnostics), one line of diagnostics.jsonl."""
    clip = {"grad_norm": norm, "clip_factor": min(1.0, run.cfg.grad_clip / max(norm, 1e-12))
            if run.cfg.grad_clip > 0 else 1.0}
    for k, v in clip.items():
        since.setdefault(k, []).append(v)
    if diagnostics and run.accelerator.is_main_process:
        with open(run.out / "diagnostics.jsonl", "a") as fh:
            fh.write(json_text({"step": run.state["step"], **diagnostics, **clip}) + "\n")


def log_line(run: Run, window: dict[str, list[float]], meter: ThroughputMeter, lr: float):
    """Mean training scalars since the last line, learning rate, examples/s and the fraction of the matmul peak."""
    ex_s, frac = meter.read()
    meter.reset()
    scalars = " · ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in window.items())
    run.say(f"step {run.state['step']}/{run.total_steps} · {scalars} · lr {lr:.2e} · "
            f"{ex_s * run.accelerator.num_processes:.1f} ex/s · {frac:.0%} of peak")
    window.clear()


def evaluate_and_checkpoint(run: Run, since: dict[str, list[float]]):
    """Dev evaluation on the main process; keep the best model; write a resumable checkpoint."""
    state, accelerator = run.state, run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        dev, val = (evaluate_split(run.model, data, run.ds.label_names, run.tokenizer.pad_token_id,
                                   run.cfg.eval_batch_size) if data is not None else None
                    for data in (run.dev_data, run.val_data))
        record = {"step": state["step"], "epoch": round(state["step"] / run.steps_per_epoch, 3),
                  "dev_accuracy": dev["accuracy"], "dev_macro_f1": dev["macro_f1"], "dev_loss": dev["loss"],
                  **({"val_accuracy": val["accuracy"], "val_loss": val["loss"]} if val else {}),
                  "skipped_steps": state["skipped_steps"],
                  **{f"train_{k}": sum(v) / len(v) for k, v in since.items() if v}}
        chosen = val or dev  # with a validation split, dev is only reported
        state["last_accuracy"] = chosen["accuracy"]
        # a method may not be itself yet early on (CARL is FreeLB before its start step): no best model from then
        eligible = state["step"] > run.method.select_after_step or state["step"] >= run.total_steps
        improved = eligible and chosen["accuracy"] > state["best_accuracy"]
        if improved:
            state.update(best_accuracy=chosen["accuracy"], best_step=state["step"], best_dev=dev, best_val=val)
            save_best(run.model, run.tokenizer, run.out)
        with open(run.out / "metrics.jsonl", "a") as fh:
            fh.write(json_text(record) + "\n")
        best = " (best)" if improved else ""  # marks the split the checkpoint is chosen on
        run.say(f"eval step {state['step']}: " + (f"validation accuracy {val['accuracy']:.4f}{best} · " if val else "")
                + f"dev accuracy {dev['accuracy']:.4f}{'' if val else best} · dev loss {dev['loss']:.4f}")
    run.method.after_evaluate(state["step"], broadcast_object(state.get("last_accuracy")))  # one decision for all
    save_checkpoint(accelerator, run.out, run.model, run.method, state)
    since.clear()
    if run.on_evaluate is not None and accelerator.is_main_process:
        run.on_evaluate(state["step"], state["last_accuracy"])


def finish(run: Run, train_examples: int, peak: float) -> dict:
    """final_metrics.json: best dev metrics, test metrics of the best model when a test split exists, speed."""
    state, cfg = run.state, run.cfg
    seconds = max(state["train_seconds"], 1e-9)
    final = {"method": cfg.method, "model": cfg.model, "dataset": run.ds.name, "steps": state["step"],
             "train_examples": train_examples, "examples_seen": state["examples_seen"],
             "train_seconds": round(state["train_seconds"], 1),
             "examples_per_s": round(state["examples_seen"] / seconds, 1),
             # real (non-pad) tokens only, against the fp32 matmul peak timed at start-up
             "useful_gflops_per_s": round(state["useful_flops"] / seconds / 1e9, 1),
             "matmul_peak_gflops": round(peak / 1e9, 1), "parameters": count_parameters(run.model),
             "skipped_steps": state["skipped_steps"], "best_step": state["best_step"], "dev": state["best_dev"],
             **({"validation": state["best_val"]} if state.get("best_val") else {}),
             **({"init_from": state["init_from"]} if state.get("init_from") else {})}
    if run.accelerator.is_main_process:
        if "test" in run.ds.splits:
            from carlrar.models import load_trained

            test_data = EncodedSplit(run.ds.splits["test"], run.tokenizer, cfg.max_length)
            final["test"] = evaluate_split(load_trained(run.out), test_data, run.ds.label_names,
                                           run.tokenizer.pad_token_id, cfg.eval_batch_size)
        write_whole(run.out / "final_metrics.json", json_text(final, indent=2))
        chosen_on = f"validation accuracy {state['best_accuracy']:.4f} (dev {final['dev']['accuracy']:.4f})" \
            if state.get("best_val") else f"dev accuracy {state['best_accuracy']:.4f}"
        run.say(f"done: best {chosen_on} at step {state['best_step']} · "
                f"{final['examples_per_s']} ex/s over {final['train_seconds']} s · model in {run.out}")
    return final
