"""Data-parallel pieces: gradient averaging and what CARL's memory banks need to stay identical on every process.

carlrar does not wrap the model in DistributedDataParallel. FreeLB runs n backward passes per step, RAR's head and
CARL's second forward act outside ``model.forward``, and some heads sit unused for the first steps: DDP's
per-backward reducer fights all three. Instead every process accumulates its gradients locally over all passes and
micro-batches, and ``average_gradients`` all-reduces them once per optimiser step (one flat buffer). On one process
every function here is a no-op. ``make_accelerator`` builds the one Accelerator a run uses (device, processes,
mixed precision).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from carlrar.errors import UserError


def make_accelerator(mixed_precision: str = "no"):
    """The run's Accelerator. ``mixed_precision`` (no, bf16, fp16) sets what ``accelerator.autocast()`` does around
    the passes; parameters, optimiser state, δ and CARL's banks stay in their own dtype (fp32) whatever it is."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    on_accelerator = torch.accelerator.is_available()
    if mixed_precision == "fp16" and not on_accelerator:  # accelerate would silently train in fp32
        raise UserError("mixed_precision = 'fp16': needs a GPU (fp16 autocast with a gradient scaler); on a CPU use "
                        "bf16 or no")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        # accelerate keeps one precision per process; a second train() in the same process (tests, search) may
        # ask for another: forget the old one (the process group, in PartialState, is kept)
        AcceleratorState._reset_state()
    # cpu=True when there is no accelerator: otherwise accelerate ignores torchrun's processes on a CPU-only machine;
    # step_scheduler_with_optimizer=False: our schedule counts optimiser steps of the global batch already;
    # a long timeout: the other processes wait while the main one evaluates the whole dev set
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(cpu=not on_accelerator, step_scheduler_with_optimizer=False, mixed_precision=mixed_precision,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=3))])


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def broadcast_parameters(model: torch.nn.Module):
    """Start every process from rank 0's weights (seeded inits agree anyway; this makes it certain)."""
    if world_size() > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def average_gradients(model: torch.nn.Module):
    """Mean of every parameter's gradient over processes, in one all-reduce. Every process runs the same method
    code, so the same parameters have gradients everywhere."""
    if world_size() == 1:
        return
    grads = [p.grad for p in {id(p): p for p in model.parameters()}.values() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over processes (e.g. NCE's Z estimate, so every process keeps the same Z)."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def total_rows(rows: int) -> int:
    """Sum of a row count over processes (a global batch split into unequal slices)."""
    if world_size() == 1:
        return rows
    x = torch.tensor([rows])
    dist.all_reduce(x)
    return int(x.item())


def any_process(flag: bool) -> bool:
    """True on every process if it is true on any one (so all take the same decision)."""
    if world_size() == 1:
        return flag
    x = torch.tensor([float(flag)])
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's rows from every process, concatenated rank by rank (row counts may differ)."""
    n = world_size()
    if n == 1:
        return tensors
    size = torch.tensor([len(tensors[0])])
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    out = []
    for t in tensors:
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
    return tuple(out)


def global_batch_order(local_rows: int) -> tuple[torch.Tensor, slice]:
    """For rows gathered rank by rank from a global batch split as ``batch[rank::world]``
    (``LengthGroupedBatchSampler``): the permutation that restores the global batch's order, and this process's
    slice of it. Lets every process draw random numbers for the whole global batch, as one process would."""
    n = world_size()
    if n == 1:
        return torch.arange(local_rows), slice(None)
    (sizes,) = gather_rows(torch.tensor([local_rows]))
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes[:-1]]), 0)
    total = int(sizes.sum())
    g = torch.arange(total)
    return offsets[g % n] + g // n, slice(rank(), None, n)


def broadcast_object(obj):
    """Rank 0's picklable ``obj`` on every process (e.g. whether a run resumes)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
