"""Process-group helpers for `torchrun`: one process per rank, rank 0 owns tracking, the others only compute.

Without `WORLD_SIZE` > 1 in the environment every helper acts as for a single process (rank 0 of 1).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when launched by torchrun (or similar) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True inside a joined process group."""
    return dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 outside a distributed launch."""
    return int(os.environ.get("RANK", "0")) if is_distributed() else 0


def world_size() -> int:
    """Number of processes; 1 outside a distributed launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE); 1 outside a distributed launch."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine; picks its CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(device: torch.device) -> torch.device:
    """`device` with its CUDA index set to this rank's local GPU; unchanged for CPU or a single process."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def init(device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo on CPU) when distributed; return whether this call joined it."""
    if not is_distributed() or active():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device_for(device))  # NCCL collectives run on the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def destroy() -> None:
    """Leave the process group, if joined."""
    if active():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Joined process group for the block when distributed; left again only if this block joined it.

    Leaving is collective: after the block, each rank waits at a barrier until every rank is done, so none tears
    the group down while another still uses it (a rank that left early was seen to abort at exit, SIGABRT, while
    rank 0 still tested its student). On an exception a rank leaves at once: torchrun stops the others."""
    joined = init(device)
    try:
        yield
        if joined:
            barrier()
    finally:
        if joined:
            destroy()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (picklable); the object itself outside a process group."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank; `[obj]` outside a process group."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank gets here; no-op outside a process group."""
    if active():
        dist.barrier(device_ids=[local_rank()] if dist.get_backend() == "nccl" else None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank, in place; unchanged outside a process group."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel inside a process group (it broadcasts rank 0's weights now and averages
    gradients in backward); `model` itself otherwise. Evaluate the unwrapped model: the wrapper's forward syncs."""
    if not active():
        return model
    ids = [device_for(device).index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of `module`'s trainable parameters over the ranks as backward produces them.

    For parts trained beside a DDP model but outside its forward (feature-distillation connectors). Every rank
    must give every such parameter a gradient each step, in the same order, as the same graph does."""
    if not active():
        return
    for param in module.parameters():
        if param.requires_grad:
            dist.broadcast(param.data, src=0)  # start equal, as DDP does for the model
            param.register_post_accumulate_grad_hook(_average_grad)


def _average_grad(param: torch.Tensor) -> None:
    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
    param.grad /= dist.get_world_size()


def owned_chunks(n_chunks: int) -> list[int]:
    """The chunks this rank computes: chunk c belongs to rank c % world_size (all of them for one process)."""
    return list(range(rank(), n_chunks, world_size()))
