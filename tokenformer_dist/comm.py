"""The project's own collectives, in one place (megatron-core's mappings and the model's named autograd
collectives in model/mappings.py are the only other callers of torch.distributed collectives).

Why one module: under NCCL a collective on a CPU tensor fails ("No backend type associated with device
type cpu"). Every function here first moves its tensor to the compute device that `parallel.init_distributed`
registered (`set_device`), so the trainer, evaluation and checkpointing never hand NCCL a host tensor; the
default process group is also created with a device->backend map (`cpu:gloo,cuda:nccl`), so a stray CPU
tensor would still work, only slower. tests/test_comm.py fails if a torch.distributed collective is called
anywhere else in the package.

Results stay on the device: reading one (`.item()`, `.cpu()`) is a host sync, which the trainer does only
on logging steps and every `train.preempt_check_every` steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_device = torch.device("cpu")


def set_device(device: torch.device) -> None:
    """The device collectives run on (called once by parallel.init_distributed)."""
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
