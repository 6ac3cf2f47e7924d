"""Collectives of the model, without megatron-core.

Pattention's two (named autograd functions on an explicit group; megatron-core's mappings do not provide
them): Θ normalizes over ALL n parameter tokens while each rank holds only n/tp of them.
`TensorParallelRegions`: the region borders the modules call (identity on one device); model/tensor_parallel.py
binds them to megatron-core's mappings and a TP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


class TensorParallelRegions:
    """The collectives a model module calls at the borders of its tensor-parallel regions.

    This base class is the single-device case: every region is the identity and the loss is torch's fused
    cross entropy. `model.tensor_parallel` installs a subclass bound to an explicit TP group (megatron-core's
    mappings with `group=`), so the model modules themselves never import megatron-core.
    """

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        """Enter a region whose parameters are sharded: forward identity, backward all-reduce."""
        return x

    def reduce_from(self, x: torch.Tensor) -> torch.Tensor:
        """Leave it: forward all-reduce of the partial sums, backward identity."""
        return x

    def reduce_scatter_first_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Forward reduce-scatter along dim 0 (partial sums onto this rank's slice), backward all-gather."""
        return x

    def gather_first_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Forward all-gather along dim 0, backward reduce-scatter (the consumer holds shards)."""
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Forward all-gather along the last dim (vocab shards → full logits), backward split."""
        return x

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [b, s] (fp32) from (this rank's vocab shard of) the logits, left unchanged."""
        # the whole vocabulary on one rank: torch's fused log-softmax kernel, same function with fewer passes
        # over the [b, s, V] logits than megatron's sharded formula (P5, docs/training.md)
        flat = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
        return flat.view(labels.shape)


SINGLE_DEVICE = TensorParallelRegions()
