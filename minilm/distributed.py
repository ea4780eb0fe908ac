"""Several processes, one model: PyTorch's own DistributedDataParallel and FSDP2, via torchrun.

    torchrun --nproc_per_node=4 train.py ...                                 one machine, 4 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 --rdzv_id=myrun train.py ...          two machines

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup()` reads
them, joins the process group (NCCL on CUDA, gloo on CPU) and picks this process's device. A
plain `python train.py` is simply world size 1, with no process group at all.

How data parallelism stays exact here:
  * every rank draws different windows: micro-batch m of rank r is global micro-batch
    r * grad_accum + m of the step, so 2 ranks x 1 micro-batch read exactly what 1 rank x 2
    micro-batches would (the test relies on it);
  * the target counts are summed over all micro-batches of all ranks before any loss is formed,
    and DDP averages gradients over ranks, so each rank's loss is scaled by world_size: the result
    is the gradient of one global batch;
  * gradients are all-reduced once per step: micro-batches before the last run forward *and*
    backward inside no_sync() (setting it only around backward is a known bug: DDP decides at
    forward time).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from minilm.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> tuple[DistInfo, str]:
    """Join the process group when launched by torchrun; returns (info, device name to use)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(), device_name
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        device_name = f"cuda:{info.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return info, device_name


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_process(code: int) -> NoReturn:
    """Exit with `code`. A torchrun worker leaves the process group, flushes its output and then
    skips the interpreter's shutdown (os._exit).

    Why: gloo runs collectives on its own C++ threads, and such a thread may still be releasing the
    buffers of the last collective (FSDP's all-gathers, say) when the main thread ends. Releasing a
    tensor that Python once held needs the GIL; a thread that asks a finalizing interpreter for it
    is killed mid-destructor and the whole process aborts ("terminate called without an active
    exception", SIGABRT) after all its work was done and written. destroy_process_group() does not
    stop those threads while FSDP still holds the group, so the only sure way is not to finalize.
    Everything this library writes is closed (and checkpoints fsynced) before we get here."""
    if launched_by_torchrun():
        teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_dict(values: dict, info: DistInfo, device) -> dict:
    """Sum a dict of scalars (tensors or numbers) over ranks, in one collective."""
    if not info.enabled:
        return values
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(keys, stacked.unbind()))


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def on_main(fn, info: DistInfo):
    """fn() on rank 0 only (checks, locks, data preparation); the others get None. A UserError on
    rank 0 is raised on every rank, so no process waits forever at the next collective for one
    that has already exited with its one-line error."""
    if not info.enabled:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    return result


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type == "cuda":
        return DDP(model, device_ids=[device.index])
    return DDP(model)


def shard_fsdp(objective: torch.nn.Module) -> None:
    """FSDP2: shard every Block's parameters across ranks, then the rest (embeddings, heads).
    Parameters become DTensors in place; the module keeps its class and its forward."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from None
    for block in objective.backbone.blocks:
        fully_shard(block)
    fully_shard(objective)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool):
    """Suppress the gradient all-reduce (DDP) or reduce-scatter (FSDP2) when `skip` (micro-steps
    before the last): gradients then accumulate locally and are synchronized once per step.
    DDP decides at the forward whether the backward will sync, so the forward must run inside."""
    if hasattr(model, "no_sync"):                              # DDP
        with (model.no_sync() if skip else contextlib.nullcontext()):
            yield
    elif hasattr(model, "set_requires_gradient_sync"):         # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(not skip)
        yield
    else:
        yield


def full_state_dicts(objective: torch.nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state as plain, unsharded tensors (collective under FSDP: every rank
    must call it). The result loads into a single-process run."""
    if not fsdp:
        return objective.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(objective, options=options),
            get_optimizer_state_dict(objective, optimizer, options=options))


def load_full_state_dicts(objective, optimizer, model_state: dict, optim_state: dict, fsdp: bool) -> None:
    if not fsdp:
        objective.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(objective, model_state, options=options)
    set_optimizer_state_dict(objective, optimizer, optim_state, options=options)


# ----------------------------------------------------------------------------- contrastive losses (simcse)
class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own slice summed over every
    rank's loss: rank r's loss uses all ranks' rows (as negatives), so rows of rank s receive
    gradient from the losses of every rank. A plain dist.all_gather returns tensors with no
    gradient (SimCSE's reference then puts its own grad-carrying slice back, which loses the other
    ranks' terms; it computes the whole global loss on every rank instead)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank = local.shape[0], rank
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_gradient(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's `local` rows concatenated in rank order, the index where this rank's rows
    start) — differentiable: the backward sums the gradients of all ranks for this rank's rows.
    Every rank must call it with the same shape. Without a process group: (local, 0).

    Contrastive losses use it so the negatives come from the global batch; each rank then takes
    its own rows as queries (loss = its share of the global loss), and with DDP's averaged
    gradients times the trainer's world_size factor the result is the gradient of the global loss."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, 0
    return _GatherWithGradient.apply(local), dist.get_rank() * local.shape[0]
