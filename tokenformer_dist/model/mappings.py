"""Collectives of Pattention that megatron-core's mappings do not provide, as named autograd functions.

megatron-core supplies the rest (copy_to / reduce_from / reduce_scatter / gather regions); these two are
needed because Θ normalizes over ALL n parameter tokens while each rank holds only n/tp of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSumBothWays(torch.autograd.Function):
    """Forward: all-reduce (sum of per-shard partial sums). Backward: all-reduce.

    The global sum feeds each rank's own, different shard downstream, so its gradient is the sum of every
    rank's contribution (unlike reduce_from_tensor_model_parallel_region, whose downstream is replicated).
    """

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        if group is None or group.size() == 1:
            return partial
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.group is None or ctx.group.size() == 1:
            return grad, None
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum_both_ways(partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum a per-shard partial across the TP group; gradients are summed across it as well."""
    return _AllReduceSumBothWays.apply(partial, group)


def all_reduce_max_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Element-wise max across the TP group, detached (softmax's stabilizing shift cancels in the math)."""
    x = x.detach()
    if group is None or group.size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x
