"""A run's output directory: who owns it, the atomic resumable checkpoint, exact resume, the best model.

Layout (``OUT``):
  config.json, model.safetensors, tokenizer files   the best-dev model in Hugging Face format (pipeline() loads it)
  carlrar_config.yaml                               the full resolved configuration
  metrics.jsonl                                     one line per dev evaluation (+ mean training scalars since the last)
  final_metrics.json                                best dev metrics, test metrics when a test split exists, speed
  checkpoint/                                       latest resumable state (model, optimiser, schedule, RNG, position)

A checkpoint is written to ``checkpoint.tmp`` and swapped into place; ``trainer_state.json`` is written last and
marks a complete copy, so a kill at any moment leaves the previous complete checkpoint (``recover_checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model

from carlrar.config import write_yaml
from carlrar.distributed import broadcast_object
from carlrar.errors import UserError
from carlrar.ownership import (cannot_write, check_ownership, clear_run, hold_lock, mark, remove_own,
                               write_whole)

CHECKPOINT, STATE, METHOD_STATE, MODEL = "checkpoint", "trainer_state.json", "method_state.safetensors", "model.safetensors"
# options a resumed run may change (e.g. resume with --skip_nonfinite after a NaN stopped it)
RESUME_IGNORES = {"overwrite", "threads", "output_dir", "eval_batch_size", "log_steps", "skip_nonfinite",
                  "trust_remote_code", "diagnostics_steps"}


def recover_checkpoint(out: Path):
    """After a kill during ``replace_dir``: keep whichever complete copy exists (STATE is written last). Each folder
    goes only when all in it is carlrar's (``remove_own``): a checkpoint/ without STATE may be anyone's."""
    final, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")
    if not (final / STATE).exists():
        remove_own(final)
        for candidate in (tmp, old):
            if (candidate / STATE).exists():
                candidate.rename(final)
                break
    remove_own(tmp)
    remove_own(old)


def yaml_load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def prepare_output_dir(out: Path, config: dict) -> bool:
    """Claim ``out`` for this run (ownership and lock: ``carlrar.ownership``); return True when it holds an
    interrupted run of the same config to resume. Nothing is written before the folder is proven carlrar's."""
    inputs = {k: config.get(k) for k in ("train_file", "dev_file", "test_file")}
    check_ownership(out, inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output_dir {out}: {e.strerror}") from None
    hold_lock(out)
    check_ownership(out, inputs)  # again under the lock: another run may have changed it meanwhile
    try:
        mark(out)
        recover_checkpoint(out)
        finished, resumable = (out / "final_metrics.json").exists(), (out / CHECKPOINT / STATE).exists()
        if config["overwrite"] or not (finished or resumable):  # not resumable: killed before its first checkpoint
            clear_run(out)
            return False
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    if finished:
        raise UserError(f"{out} already holds a finished run; pass --overwrite or choose another --output_dir")
    saved = yaml_load(out / "carlrar_config.yaml")
    changed = sorted(k for k in config if k not in RESUME_IGNORES and k in saved and saved[k] != config[k])
    if changed:
        raise UserError(f"{out} holds an interrupted run with different settings ({', '.join(changed)}); "
                        "pass --overwrite or choose another --output_dir")
    return True


def claim_output_dir(out: Path, config: dict, main: bool) -> bool:
    """The main process prepares ``out`` and writes the config; every process learns whether the run resumes (or
    the one-line reason it cannot start)."""
    outcome = None
    if main:
        try:
            outcome = ("resume", prepare_output_dir(out, config))
            write_yaml(out / "carlrar_config.yaml", config)
        except OSError as e:
            outcome = ("error", f"cannot write to {out}: {e.strerror or e}")
        except UserError as e:
            outcome = ("error", str(e))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise UserError(value)
    return value


def replace_dir(tmp: Path, final: Path):
    """Swap a fully written directory into place, so a crash never leaves a half-written one behind."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, out: Path, model, method, state: dict):
    """Resumable state (optimiser, schedule, RNG of every process, model, method tensors, position), written to a
    temporary directory and swapped into place."""
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    tmp = out / (CHECKPOINT + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a failed write
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process's files are in before STATE marks the copy complete
        if main:
            save_model(model, str(tmp / MODEL))
            method_state = method.state_tensors()
            if method_state:
                save_file({k: v.contiguous() for k, v in method_state.items()}, str(tmp / METHOD_STATE))
            (tmp / (STATE + ".part")).write_text(json.dumps(state))
            os.replace(tmp / (STATE + ".part"), tmp / STATE)  # STATE marks a complete copy: never half of it
            replace_dir(tmp, out / CHECKPOINT)
    except Exception as e:  # noqa: BLE001 (a full disk: OSError, SafetensorError, torch's RuntimeError alike)
        error = cannot_write(out / CHECKPOINT, e)  # before the partial copy goes: it is what filled the disk
        shutil.rmtree(tmp, ignore_errors=True)  # the last complete checkpoint is kept
        raise UserError(f"{error}; the last complete checkpoint is kept, so the same command resumes once there is "
                        "room") from None
    accelerator.wait_for_everyone()


def resume(accelerator, out: Path, model, method, state: dict) -> dict:
    """Load the checkpoint in ``out`` into the model, optimiser, schedule, RNG and method; the loop's state.
    Records logged after the checkpoint was taken are dropped from metrics.jsonl and diagnostics.jsonl: they are
    redone."""
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
        if method.state_tensors():
            method.load_state_tensors(load_file(str(out / CHECKPOINT / METHOD_STATE)))
    except Exception as e:  # noqa: BLE001 (any unreadable piece means the same thing to the user)
        raise UserError(f"{out / CHECKPOINT}: cannot resume from this checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass --overwrite to start afresh") from None
    if accelerator.is_main_process:  # metrics: evaluations after step S; diagnostics: steps S, S + 1, ...
        for name, keep in (("metrics.jsonl", state["step"]), ("diagnostics.jsonl", state["step"] - 1)):
            records = (out / name).read_text().splitlines() if (out / name).exists() else []
            write_whole(out / name, "".join(r + "\n" for r in records if logged_step(r) <= keep))
    accelerator.wait_for_everyone()
    return state


def logged_step(line: str) -> float:
    """The step of a metrics / diagnostics line; a line torn by a kill or a full disk counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def save_best(model, tokenizer, out: Path):
    """The best-dev model in Hugging Face format at the top of ``out``, written beside and moved in file by file."""
    tmp = out / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a failed write of this run (claiming the folder checked it)
    try:
        model.save(tmp, tokenizer)
        names = [f.name for f in tmp.iterdir()]
    except Exception as e:  # noqa: BLE001 (a full disk: OSError, SafetensorError alike)
        error = cannot_write(out, e, "the best model to ")
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from None
    mark(out, names)  # listed before they land: a kill in between leaves them provably carlrar's
    for name in names:
        (tmp / name).replace(out / name)
    tmp.rmdir()


# settings a branch must share with the run it starts from, so that it continues the same data order and schedule
SAME_DATA = ("dataset", "data_dir", "train_file", "dev_file", "text_column", "label_column", "train_subset",
             "validation_size", "max_length", "group_by_length", "batch_size", "grad_accum", "seed", "model")


def init_from_run(accelerator, source: Path, config: dict, model, optimizer, state: dict,
                  weights_only: bool = False) -> dict:
    """Start from another run's latest checkpoint (``--init_from``): its weights (heads this method adds start
    fresh) and, unless ``weights_only``, its optimiser, schedule, RNG and data position, so that the new run is
    that run continued with another method (a branch). Best-model tracking, timers and counters start afresh: a
    branch is selected among its own evaluations only."""
    ckpt = source / CHECKPOINT
    if not (ckpt / STATE).is_file():
        raise UserError(f"--init_from {source}: no checkpoint/ with {STATE} (finished reproduce runs drop theirs "
                        "unless --keep-checkpoints)")
    try:
        trunk = json.loads((ckpt / STATE).read_text())
        missing, unexpected = load_model(model, str(ckpt / MODEL), strict=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--init_from {source}: cannot read its checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    new_heads = sorted({k.split(".")[1] for k in missing if k.startswith("heads.")})
    if [k for k in missing if not k.startswith("heads.")] or (unexpected and not weights_only):
        raise UserError(f"--init_from {source}: its model does not match this one (missing "
                        f"{', '.join(missing[:3]) or '-'}; unexpected {', '.join(unexpected[:3]) or '-'})")
    if weights_only:
        return state
    theirs = yaml_load(source / "carlrar_config.yaml")
    differ = [k for k in SAME_DATA if theirs.get(k) != config.get(k)]
    if differ:
        raise UserError(f"--init_from {source}: continuing its data order needs the same {', '.join(differ)} "
                        "(or pass --init_weights_only)")
    if trunk.get("num_processes", 1) != accelerator.num_processes:
        raise UserError(f"--init_from {source}: trained on {trunk['num_processes']} process(es); continue it on as "
                        "many, or pass --init_weights_only")
    with tempfile.TemporaryDirectory() as tmp:  # accelerate reads the rest (schedule, RNG) as it is
        for f in ckpt.iterdir():
            if f.name not in ("optimizer.bin", MODEL, METHOD_STATE):
                os.symlink(f.resolve(), Path(tmp) / f.name)
        torch.save(aligned_optimizer_state(torch.load(ckpt / "optimizer.bin", weights_only=True), optimizer, model,
                                           missing), Path(tmp) / "optimizer.bin")
        accelerator.load_state(tmp)  # the model is not accelerate's (it was never prepared): weights loaded above
    state = {**state, **{k: trunk[k] for k in ("step", "epoch", "batches_done")}}
    state["init_from"] = {"run": str(source), "step": trunk["step"], "new_heads": new_heads}
    return state


def aligned_optimizer_state(saved: dict, optimizer, model, missing: list[str]) -> dict:
    """The saved optimiser state renumbered for this optimiser, whose groups hold the saved run's parameters
    followed by the heads this method added (``missing``: they get fresh state)."""
    ids = {id(p): n for n, p in model.named_parameters()}
    state, param_groups, new_index = {}, [], 0
    for group, old in zip(optimizer.param_groups, saved["param_groups"]):
        names = [ids[id(p)] for p in group["params"]]
        old_names = [n for n in names if n not in missing]
        if len(old_names) != len(old["params"]) or names[:len(old_names)] != old_names:
            raise UserError("--init_from: the saved optimiser's parameters do not line up with this model's")
        for k in range(len(old_names)):
            if old["params"][k] in saved["state"]:
                state[new_index + k] = saved["state"][old["params"][k]]
        param_groups.append({**old, "params": list(range(new_index, new_index + len(names)))})
        new_index += len(names)
    return {"state": state, "param_groups": param_groups}
