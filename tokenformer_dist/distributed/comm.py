"""The project's own collectives, in one place (megatron-core's mappings and the model's named autograd
collectives in model/mappings.py are the only other callers of torch.distributed collectives).

Why one module: under NCCL a collective on a CPU tensor fails ("No backend type associated with device
type cpu"). Every function here first moves its tensor to the compute device that `launch.init_distributed`
registered (`set_device`), so the trainer, evaluation and checkpointing never hand NCCL a host tensor. On
GPU every process group is NCCL only (launch.init_distributed: no gloo mesh beside it), so a CPU tensor in
a collective would fail there. tests/test_comm.py fails if a torch.distributed collective is called
anywhere else in the package.

Results stay on the device: reading one (`.item()`, `.cpu()`) is a host sync, which the trainer does only
on logging steps and every `train.preempt_check_every` steps.

Decisions that gate a collective are taken once (`decide_on_rank0`: rank 0 decides, every rank gets the
answer or rank 0's error) and what every rank must see is checked together (`require_on_every_rank`: all
stop with one line naming the node that cannot), so no rank follows its own view of a shared filesystem
into a different collective than the others, or waits alone until the timeout.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_device = torch.device("cpu")


class LaunchError(ValueError):
    """The job's environment contradicts what this process can do (one line; the trainer exits 2)."""


def set_device(device: torch.device) -> None:
    """The device collectives run on (called once by launch.init_distributed)."""
    global _device
    _device = torch.device(device)


def device() -> torch.device:
    return _device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    t = tensor.to(_device)
    if is_distributed():
        dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over `group` (the world by default). Returns a tensor on the compute device (a new one when
    the input lived elsewhere; the input itself is reduced in place when it is already there)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Element-wise max over `group`; same device rule as all_reduce_sum."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def any_rank(flag: bool | torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """True on every rank if it is true on any rank; a 0-dim bool tensor on the device (reading it syncs)."""
    t = torch.as_tensor(flag, dtype=torch.float32).reshape(1).to(_device)
    return all_reduce_max(t, group)[0] > 0


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of `group`. Under NCCL the barrier runs on the registered device."""
    if not is_distributed():
        return
    if _device.type == "cuda":
        dist.barrier(group=group, device_ids=[_device.index or 0])
    else:
        dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of global rank `src` on every rank (pickled, carried by a tensor on the registered device). The
    objects are the project's own (decisions, one-line errors), never a user's file."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (pickled, as broadcast_object)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # under NCCL on the current CUDA device, which init_distributed set
    return out


def decide_on_rank0(decide: Callable[[], T]) -> T:
    """Rank 0 runs `decide`; every rank returns its result. For decisions that gate a collective (resume from
    which checkpoint, validate or not, save or not): taken once, not by each rank from its own view of a
    shared filesystem, where one node may see a stale file or a transient error. If `decide` raises on rank 0,
    every rank raises that error, so no rank is left waiting in the next collective until the timeout."""
    rank0 = not is_distributed() or dist.get_rank() == 0
    result, error, raised = None, None, None
    if rank0:
        try:
            result = decide()
        except Exception as e:  # handed to every rank, raised there
            raised, error = e, _portable(e)
    result, error = broadcast_object((result, error))
    if raised is not None:
        raise raised
    if error is not None:
        raise error
    return result


def _portable(e: Exception) -> Exception:
    """`e` if it survives pickling (ConfigError, DatasetError, OSError: the class decides the exit code), else
    a RuntimeError with its message."""
    try:
        return pickle.loads(pickle.dumps(e))  # our own exception, pickled a moment ago on rank 0
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def require_on_every_rank(check: Callable[[], str | None]) -> None:
    """Every rank runs `check`: None if this rank is fine, else one line saying what it cannot see or do (an
    exception counts as that line). If any rank has a problem, every rank raises the same LaunchError, which
    names the first such rank and its node; all ranks stop together instead of some waiting for the others."""
    try:
        problem = check()
    except Exception as e:  # reported by every rank below
        problem = str(e) or type(e).__name__
    reports = all_gather_object((problem, socket.gethostname()))
    bad = [(rank, p, host) for rank, (p, host) in enumerate(reports) if p is not None]
    if bad:
        rank, p, host = bad[0]
        more = f" (and {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
        raise LaunchError(f"rank {rank} on node {host}{more}: {p}")
