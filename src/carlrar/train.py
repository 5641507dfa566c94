"""The training loop: read it top to bottom. Methods plug in through ``training_step``; the loop owns the rest.

Output directory (``OUT``):
  config.json, model.safetensors, tokenizer files   the best-dev model in Hugging Face format (pipeline() loads it)
  carlrar_config.yaml                               the full resolved configuration
  metrics.jsonl                                     one line per dev evaluation (+ mean training scalars since the last)
  final_metrics.json                                best dev metrics, test metrics when a test split exists, speed
  checkpoint/                                       latest resumable state (model, optimiser, schedule, RNG, position)
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from carlrar.config import TrainConfig, to_dict, write_yaml
from carlrar.distributed import any_process, average_gradients, broadcast_parameters, total_rows
from carlrar.data import Collator, EncodedSplit, LengthGroupedBatchSampler, load_dataset, subset
from carlrar.errors import UserError
from carlrar.evaluate import evaluate_split
from carlrar.methods import METHODS
from carlrar.models import count_parameters, load_classifier, load_tokenizer
from carlrar.speed import ThroughputMeter, measure_matmul_peak

CHECKPOINT, STATE, METHOD_STATE, MODEL = "checkpoint", "trainer_state.json", "method_state.safetensors", "model.safetensors"
# options a resumed run may change (e.g. resume with --skip_nonfinite after a NaN stopped it)
RESUME_IGNORES = {"overwrite", "threads", "output_dir", "eval_batch_size", "log_steps", "skip_nonfinite",
                  "trust_remote_code"}


def recover_checkpoint(out: Path):
    """After a kill during ``replace_dir``: keep whichever complete copy exists (STATE is written last)."""
    final, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")
    if not (final / STATE).exists():
        shutil.rmtree(final, ignore_errors=True)
        for candidate in (tmp, old):
            if (candidate / STATE).exists():
                candidate.rename(final)
                break
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(out: Path, config: dict) -> bool:
    """Create ``out``; return True when it holds an interrupted run of the same config to resume."""
    if (out / "carlrar_config.yaml").exists():
        recover_checkpoint(out)
        if not (out / CHECKPOINT / STATE).exists() and not (out / "final_metrics.json").exists():
            shutil.rmtree(out)  # killed before its first checkpoint: nothing to resume
    if (out / "final_metrics.json").exists() and not config["overwrite"]:
        raise UserError(f"{out} already holds a finished run; pass --overwrite or choose another --output_dir")
    if (out / CHECKPOINT / STATE).exists() and not config["overwrite"]:
        saved = yaml_load(out / "carlrar_config.yaml")
        changed = sorted(k for k in config if k not in RESUME_IGNORES and k in saved and saved[k] != config[k])
        if changed:
            raise UserError(f"{out} holds an interrupted run with different settings ({', '.join(changed)}); "
                            "pass --overwrite or choose another --output_dir")
        return True
    if out.exists() and config["overwrite"] and (out / "carlrar_config.yaml").exists():
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a carlrar run; choose another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror}") from None
    return False


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) if path.exists() else {}


def replace_dir(tmp: Path, final: Path):
    """Swap a fully written directory into place, so a crash never leaves a half-written one behind."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: TrainConfig, *method_configs, on_evaluate=None) -> dict:
    """Train ``cfg.method`` with its config dataclasses (``METHODS[...].config_classes``; defaults when omitted).
    ``on_evaluate(step, dev_accuracy)`` is called after each dev evaluation and checkpoint (e.g. to prune a search
    trial by raising)."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r} (known: {', '.join(METHODS)})")
    method_cls = METHODS[cfg.method]
    method_configs = method_configs or tuple(c() for c in method_cls.config_classes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # Everything that can fail on bad input happens before the output directory is touched.
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_file, cfg.dev_file, cfg.test_file,
                      cfg.text_column, cfg.label_column)
    train_split = subset(ds.split("train"), cfg.train_subset, cfg.seed)
    tokenizer = load_tokenizer(cfg.model, train_split.texts, cfg.trust_remote_code)
    set_seed(cfg.seed)
    model = load_classifier(cfg.model, ds.label_names, cfg.trust_remote_code)
    # cpu=True when there is no GPU: otherwise accelerate ignores torchrun's processes on a CPU-only machine
    # step_scheduler_with_optimizer=False: our schedule counts optimiser steps of the global batch already
    # (accelerate would otherwise step it once per process)
    # a long timeout: the other processes wait while the main one evaluates the whole dev set
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), step_scheduler_with_optimizer=False,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=3))])
    main = accelerator.is_main_process
    out = cfg.resolved_output_dir()
    config = {**to_dict(cfg, *method_configs), "label_names": ds.label_names}
    outcome = [None]
    if main:  # one process owns the output directory; the others learn whether it resumes (or why it failed)
        try:
            outcome = [("resume", prepare_output_dir(out, config))]
            write_yaml(out / "carlrar_config.yaml", config)
        except UserError as e:
            outcome = [("error", str(e))]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "error":
        raise UserError(outcome[0][1])
    resuming = outcome[0][1]

    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if main else (lambda msg: None)
    train_data = EncodedSplit(train_split, tokenizer, cfg.max_length)
    dev_data = EncodedSplit(ds.split("dev"), tokenizer, cfg.max_length)
    sampler = LengthGroupedBatchSampler(train_data.lengths, cfg.batch_size * accelerator.num_processes, cfg.seed,
                                        cfg.group_by_length, rank=accelerator.process_index,
                                        num_replicas=accelerator.num_processes)
    collate = Collator(tokenizer.pad_token_id)
    # own generator: each new iterator draws a seed, which must not move the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(train_data, batch_sampler=sampler, collate_fn=collate,
                                         generator=torch.Generator())
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # before the optimiser: a method may add heads to the model (RAR's reconstructor)
    method = method_cls(*method_configs, model=model, train_labels=train_data.labels, total_steps=total_steps,
                        train_config=cfg)
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n  # noqa: E731
    groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    # no DistributedDataParallel wrapper: gradients are averaged once per step (carlrar.distributed explains why)
    model = model.to(accelerator.device)
    broadcast_parameters(model)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)

    state = {"step": 0, "epoch": 0, "batches_done": 0, "best_accuracy": -1.0, "best_step": None,
             "best_dev": None, "train_seconds": 0.0, "examples_seen": 0, "useful_flops": 0.0,
             "skipped_steps": 0, "num_processes": accelerator.num_processes}
    if resuming:
        try:
            saved = json.loads((out / CHECKPOINT / STATE).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{out / CHECKPOINT / STATE}: unreadable ({e}); pass --overwrite to start afresh") from None
        if saved.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
            raise UserError(f"{out} was trained on {saved['num_processes']} process(es); resume it on as many (the "
                            "data position depends on the global batch), or pass --overwrite")
        try:  # safetensors, JSON, and accelerate's torch.load(weights_only=True): no code runs from a checkpoint
            accelerator.load_state(str(out / CHECKPOINT))  # optimiser, schedule, RNG of every process
            load_model(model, str(out / CHECKPOINT / MODEL))
            state = {**state, **saved}
            if hasattr(method, "state_tensors"):
                method.load_state_tensors(load_file(str(out / CHECKPOINT / METHOD_STATE)))
        except Exception as e:  # noqa: BLE001 (any unreadable piece means the same thing to the user)
            raise UserError(f"{out / CHECKPOINT}: cannot resume from this checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass --overwrite to start afresh") from None
        if main:  # evaluations logged after the checkpoint was taken are redone on the way
            records = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            (out / "metrics.jsonl").write_text("".join(r + "\n" for r in records
                                                       if json.loads(r)["step"] <= state["step"]))
        accelerator.wait_for_everyone()
        say(f"resuming {out} from step {state['step']} (epoch {state['epoch']}, batch {state['batches_done']})")

    peak = measure_matmul_peak()
    meter = ThroughputMeter(accelerator.unwrap_model(model).config, peak)
    say(f"{cfg.method} · {cfg.model} ({count_parameters(model):,} parameters) · {ds.name} train {len(train_data):,} "
        f"/ dev {len(dev_data):,} · {total_steps} steps of {cfg.batch_size * cfg.grad_accum * accelerator.num_processes}"
        f" · {torch.get_num_threads()} threads, matmul peak {peak / 1e9:.0f} GFLOP/s")

    def checkpoint():
        """Resumable state, written to a temporary directory and swapped into place."""
        accelerator.wait_for_everyone()
        tmp = out / (CHECKPOINT + ".tmp")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a failed write
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every process's files are in before STATE marks the copy complete
            if main:
                save_model(accelerator.unwrap_model(model), str(tmp / MODEL))
                if hasattr(method, "state_tensors"):
                    save_file({k: v.contiguous() for k, v in method.state_tensors().items()}, str(tmp / METHOD_STATE))
                (tmp / (STATE + ".part")).write_text(json.dumps(state))
                os.replace(tmp / (STATE + ".part"), tmp / STATE)  # STATE marks a complete copy: never half of it
                replace_dir(tmp, out / CHECKPOINT)
        except OSError as e:  # e.g. disk full: drop the partial copy, keep the last complete checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write a checkpoint to {out}: {e.strerror or e}; the last complete checkpoint "
                            "is kept, so the same command resumes once there is room") from None
        accelerator.wait_for_everyone()

    def evaluate_and_checkpoint(since: dict):
        """Dev evaluation on the main process; keep the best model; write a resumable checkpoint."""
        accelerator.wait_for_everyone()
        if main:
            unwrapped = accelerator.unwrap_model(model)
            dev = evaluate_split(unwrapped, dev_data, ds.label_names, tokenizer.pad_token_id, cfg.eval_batch_size)
            record = {"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 3),
                      "dev_accuracy": dev["accuracy"], "dev_macro_f1": dev["macro_f1"], "dev_loss": dev["loss"],
                      "skipped_steps": state["skipped_steps"],
                      **{f"train_{k}": sum(v) / len(v) for k, v in since.items() if v}}
            state["last_accuracy"] = dev["accuracy"]
            # a method may not be itself yet early on (CARL is FreeLB before its start step): no best model from then
            eligible = state["step"] > getattr(method, "select_after_step", 0) or state["step"] >= total_steps
            improved = eligible and dev["accuracy"] > state["best_accuracy"]
            if improved:
                state.update(best_accuracy=dev["accuracy"], best_step=state["step"], best_dev=dev)
                tmp = out / "best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                unwrapped.save(tmp, tokenizer)
                for f in tmp.iterdir():
                    f.replace(out / f.name)
                tmp.rmdir()
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            say(f"eval step {state['step']}: dev accuracy {dev['accuracy']:.4f}"
                f"{' (best)' if improved else ''} · dev loss {dev['loss']:.4f}")
        checkpoint()
        since.clear()
        if on_evaluate is not None and main:
            on_evaluate(state["step"], state["last_accuracy"])

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not (main and sys.stderr.isatty()),
               dynamic_ncols=True)
    since: dict[str, list[float]] = {}  # training scalars since the last evaluation
    window: dict[str, list[float]] = {}  # ... since the last log line
    started = time.perf_counter()
    while state["step"] < total_steps:
        if state["batches_done"] >= len(sampler):  # resumed from a checkpoint taken on an epoch's last batch
            state["epoch"] += 1
            state["batches_done"] = 0
        sampler.set_epoch(state["epoch"])
        sampler.start = state["batches_done"]
        micro, evaluated, nonfinite = 0, False, []
        for batch in loader:
            if micro % cfg.grad_accum == 0 and hasattr(method, "before_step") and method.before_step(
                    state["step"], model, train_data, collate, cfg.eval_batch_size):
                checkpoint()  # e.g. CARL's filled banks: a resumed run must not fill them again
                meter.reset()
            scale = 1.0 / cfg.grad_accum
            if accelerator.num_processes > 1:  # unequal slices of a global batch: weight by rows, as one process
                scale *= len(batch["labels"]) * accelerator.num_processes / total_rows(len(batch["labels"]))
            sync = (micro + 1) % cfg.grad_accum == 0 or state["batches_done"] + 1 == len(sampler)
            logs = method.training_step(model, batch, accelerator.backward, scale, state["step"])
            state["useful_flops"] += meter.add(batch["attention_mask"], method.passes) * accelerator.num_processes
            nonfinite += [k for k, v in logs.items() if not math.isfinite(v)]
            for k, v in logs.items():
                since.setdefault(k, []).append(v)
                window.setdefault(k, []).append(v)
            micro += 1
            state["batches_done"] += 1
            state["examples_seen"] += len(batch["labels"]) * accelerator.num_processes
            if not sync:
                continue
            average_gradients(model)  # over processes, once per optimiser step, whatever the passes and micro-batches
            # the norm is needed anyway to catch a non-finite gradient; inf max-norm clips nothing
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            nonfinite += [] if torch.isfinite(norm) else ["gradient"]
            if any_process(bool(nonfinite)) and not nonfinite:  # all processes take the same decision
                nonfinite = ["loss on another process"]
            if nonfinite and not cfg.skip_nonfinite:
                raise UserError(f"non-finite {', '.join(dict.fromkeys(nonfinite))} at step {state['step']} "
                                f"(epoch {state['epoch']}); lower --lr or --adv_lr, set --adv_start_step, or pass "
                                "--skip_nonfinite to skip such steps")
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)  # skipped: no update from this batch
                state["skipped_steps"] += 1
                say(f"step {state['step']}: non-finite {', '.join(dict.fromkeys(nonfinite))}, step skipped "
                    f"({state['skipped_steps']} so far)")
                nonfinite = []
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            evaluated = False
            bar.update(1)
            if state["step"] % cfg.log_steps == 0 or state["step"] == total_steps:
                ex_s, frac = meter.read()
                meter.reset()
                scalars = " · ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in window.items())
                say(f"step {state['step']}/{total_steps} · {scalars} · lr {scheduler.get_last_lr()[0]:.2e} · "
                    f"{ex_s * accelerator.num_processes:.1f} ex/s · {frac:.0%} of peak")
                window.clear()
            if cfg.eval_steps and state["step"] % cfg.eval_steps == 0:
                state["train_seconds"] += time.perf_counter() - started
                evaluate_and_checkpoint(since)
                started, evaluated = time.perf_counter(), True
                meter.reset()
            if state["step"] >= total_steps:
                break
        else:  # epoch finished
            state["epoch"] += 1
            state["batches_done"] = 0
        if not evaluated:
            state["train_seconds"] += time.perf_counter() - started
            evaluate_and_checkpoint(since)
            started = time.perf_counter()
    bar.close()

    final = {"method": cfg.method, "model": cfg.model, "dataset": ds.name, "steps": state["step"],
             "train_examples": len(train_data), "examples_seen": state["examples_seen"],
             "train_seconds": round(state["train_seconds"], 1),
             "examples_per_s": round(state["examples_seen"] / max(state["train_seconds"], 1e-9), 1),
             # real (non-pad) tokens only, against the fp32 matmul peak timed at start-up
             "useful_gflops_per_s": round(state["useful_flops"] / max(state["train_seconds"], 1e-9) / 1e9, 1),
             "matmul_peak_gflops": round(peak / 1e9, 1),
             "parameters": count_parameters(accelerator.unwrap_model(model)),
             "skipped_steps": state["skipped_steps"], "best_step": state["best_step"], "dev": state["best_dev"]}
    if main:
        if "test" in ds.splits:
            from carlrar.models import load_trained

            test_data = EncodedSplit(ds.splits["test"], tokenizer, cfg.max_length)
            final["test"] = evaluate_split(load_trained(out), test_data, ds.label_names, tokenizer.pad_token_id,
                                           cfg.eval_batch_size)
        (out / "final_metrics.json").write_text(json.dumps(final, indent=2))
        say(f"done: best dev accuracy {state['best_accuracy']:.4f} at step {state['best_step']} · "
            f"{final['examples_per_s']} ex/s over {final['train_seconds']} s · model in {out}")
    return final
