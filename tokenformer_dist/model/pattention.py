"""Pattention: token-parameter attention, Θ(X·Kᵀ)·V, single-device and tensor-parallel.

The math lives in `pattention()`; `Pattention` (one device) and `ShardedPattention` (parameter tokens
sharded over tensor-parallel ranks) both call it. With TP the only extra communication inside the math is
one all-reduce of a [tokens, 1] fp32 tensor: Θ normalizes over all n parameter tokens, not the local n/tp.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from tokenformer_dist.model.init import master_normal
from tokenformer_dist.model.mappings import all_reduce_max_no_grad, all_reduce_sum_both_ways
from tokenformer_dist.parallel import shard_range


def _inverse_norm(sum_sq: torch.Tensor) -> torch.Tensor:
    """1/sqrt(sum_sq), and 0 (not inf, not NaN — also in backward) for a row whose scores are all zero."""
    nonzero = sum_sq > 0
    return torch.where(nonzero, torch.rsqrt(torch.where(nonzero, sum_sq, torch.ones_like(sum_sq))), 0.0)


def normalize_scores(scores: torch.Tensor, tau: float | torch.Tensor, norm: str,
                     group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Θ over the parameter-token axis (last) of `scores`, which may be this rank's shard of it.

    l2_norm_gelu: GeLU(A / ‖A‖₂ · τ)   gelu_l2_norm: GeLU(A) / ‖GeLU(A)‖₂ · τ   softmax: softmax(A) · τ²
    τ = √n of the layer when it was created (the official code uses √n of the current n), so that appending
    tokens later leaves the function unchanged. Norms and sums are global over `group` and taken in fp32.
    """
    if norm == "l2_norm_gelu":
        sum_sq = all_reduce_sum_both_ways(scores.float().square().sum(-1, keepdim=True), group)
        return F.gelu(scores * (tau * _inverse_norm(sum_sq)).to(scores.dtype))
    if norm == "gelu_l2_norm":
        act = F.gelu(scores)
        sum_sq = all_reduce_sum_both_ways(act.float().square().sum(-1, keepdim=True), group)
        return act * (tau * _inverse_norm(sum_sq)).to(act.dtype)
    if norm == "softmax":
        shift = all_reduce_max_no_grad(scores.amax(-1, keepdim=True), group)
        exp = torch.exp(scores - shift)
        total = all_reduce_sum_both_ways(exp.float().sum(-1, keepdim=True), group)
        return exp * (tau * tau / total).to(exp.dtype)
    raise ValueError(f"unknown Pattention normalization {norm!r}; valid: l2_norm_gelu, gelu_l2_norm, softmax")


def pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: float | torch.Tensor,
               norm: str = "l2_norm_gelu", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Θ(x·Kᵀ)·V. With `group`, keys/values are this rank's rows and the result is this rank's partial sum
    (the caller reduces it: all-reduce, or reduce-scatter onto attention partitions)."""
    return normalize_scores(x @ keys.t(), tau, norm, group) @ values


class _PattentionBase(torch.nn.Module):
    """Shared parameters and τ handling; τ is a buffer kept in fp32 whatever the module's dtype."""

    tau: torch.Tensor

    def __init__(self, d_in: int, d_out: int, n_tokens: int, n_local: int, norm: str,
                 tau: float | None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.n_tokens, self.norm = d_in, d_out, n_tokens, norm
        self.key_tokens = torch.nn.Parameter(torch.zeros(n_local, d_in))
        self.value_tokens = torch.nn.Parameter(torch.zeros(n_local, d_out))
        self.register_buffer("tau", torch.tensor(math.sqrt(n_tokens) if tau is None else tau,
                                                 dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.tau = self.tau.float()  # τ is a constant of the function, not a weight: never bf16
        return self

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_tokens={self.n_tokens}, "
                f"n_local={self.key_tokens.shape[0]}, norm={self.norm}, tau={float(self.tau):.4f}")


class Pattention(_PattentionBase):
    """Single-device Pattention: key tokens [n, d_in], value tokens [n, d_out], no bias."""

    def __init__(self, d_in: int, d_out: int, n_tokens: int, norm: str = "l2_norm_gelu",
                 tau: float | None = None) -> None:
        super().__init__(d_in, d_out, n_tokens, n_tokens, norm, tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, self.key_tokens, self.value_tokens, self.tau, self.norm)


class ShardedPattention(_PattentionBase):
    """Tensor-parallel Pattention. Sharded axis: the parameter-token axis n (dim 0 of key_tokens and
    value_tokens); rank r owns the contiguous rows [r·n/tp, (r+1)·n/tp). K acts column-parallel, V
    row-parallel (as Megatron's MLP).

    Input: x replicated over the TP group (the caller marks it with copy_to_tensor_model_parallel_region
    or an equivalent gather). Output: this rank's PARTIAL sum over its tokens; the caller reduces it
    (reduce_from_tensor_model_parallel_region, or reduce-scatter onto attention partitions).
    """

    def __init__(self, d_in: int, d_out: int, n_tokens: int, norm: str = "l2_norm_gelu",
                 tau: float | None = None) -> None:
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if n_tokens % self.tp_size:
            raise ValueError(f"{n_tokens} parameter tokens cannot be sharded over tp={self.tp_size}")
        super().__init__(d_in, d_out, n_tokens, n_tokens // self.tp_size, norm, tau)
        for p in (self.key_tokens, self.value_tokens):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        return pattention(x, self.key_tokens, self.value_tokens, self.tau, self.norm, group)

    @torch.no_grad()
    def init_master(self, name: str, key_std: float, value_std: float, seed: int) -> None:
        """Copy this rank's rows of the deterministic full-size initialization (TP-independent)."""
        rows = shard_range(self.n_tokens, self.tp_rank, self.tp_size)
        for param, suffix, std, width in ((self.key_tokens, "key_tokens", key_std, self.d_in),
                                          (self.value_tokens, "value_tokens", value_std, self.d_out)):
            full = master_normal(f"{name}.{suffix}", (self.n_tokens, width), std, seed)
            param.copy_(full[rows])
