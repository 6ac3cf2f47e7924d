"""Pattention: token-parameter attention, Θ(X·Kᵀ)·V, single-device and tensor-parallel.

The math lives in `pattention()`; `Pattention` (one device) and `ShardedPattention` (parameter tokens
sharded over tensor-parallel ranks) both call it. With TP the only extra communication inside the math is
one all-reduce of a [tokens, 1] fp32 tensor: Θ normalizes over all n parameter tokens, not the local n/tp.

Two implementations of the same function (`impl`):
  "lean"      (default for training) — `lean.lean_pattention`, a torch.autograd.Function that keeps one
              [tokens, n] tensor for backward and recomputes the elementwise parts;
  "reference" — `reference_pattention`, plain autograd through `normalize_scores`: the readable math and
              what the tests compare the lean path against.
A module takes `impl=` at construction (None: the process default, from `set_default_impl()` or the
environment variable TOKENFORMER_PATTENTION_IMPL, else "lean"); `set_impl(model, impl)` switches a built
model. The choice is independent of ModelConfig.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from tokenformer_dist.model.init import master_normal
from tokenformer_dist.model.lean import inverse_norm, lean_pattention
from tokenformer_dist.model.mappings import all_reduce_max_no_grad, all_reduce_sum_both_ways
from tokenformer_dist.sharding import shard_range


def normalize_scores(scores: torch.Tensor, tau: float | torch.Tensor, norm: str,
                     group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Θ over the parameter-token axis (last) of `scores`, which may be this rank's shard of it.

    l2_norm_gelu: GeLU(A / ‖A‖₂ · τ)   gelu_l2_norm: GeLU(A) / ‖GeLU(A)‖₂ · τ   softmax: softmax(A) · τ²
    τ = √n of the layer when it was created (the official code uses √n of the current n), so that appending
    tokens later leaves the function unchanged. Norms and sums are global over `group` and taken in fp32
    (fp64 for fp64 scores).
    """
    acc = torch.promote_types(scores.dtype, torch.float32)
    if norm == "l2_norm_gelu":
        sum_sq = all_reduce_sum_both_ways(scores.to(acc).square().sum(-1, keepdim=True), group)
        return F.gelu(scores * (tau * inverse_norm(sum_sq)).to(scores.dtype))
    if norm == "gelu_l2_norm":
        act = F.gelu(scores)
        sum_sq = all_reduce_sum_both_ways(act.to(acc).square().sum(-1, keepdim=True), group)
        return act * (tau * inverse_norm(sum_sq)).to(act.dtype)
    if norm == "softmax":
        shift = all_reduce_max_no_grad(scores.amax(-1, keepdim=True), group)
        exp = torch.exp(scores - shift)
        total = all_reduce_sum_both_ways(exp.to(acc).sum(-1, keepdim=True), group)
        return exp * (tau * tau / total).to(exp.dtype)
    raise ValueError(f"unknown Pattention normalization {norm!r}; valid: l2_norm_gelu, gelu_l2_norm, softmax")


IMPLS = ("lean", "reference")
IMPL_ENV = "TOKENFORMER_PATTENTION_IMPL"
_default_impl: str | None = None  # set_default_impl() override; None: environment, else "lean"


def check_impl(impl: str, source: str = "impl") -> str:
    if impl not in IMPLS:
        raise ValueError(f"{source}: unknown Pattention implementation {impl!r}; valid: {', '.join(IMPLS)}")
    return impl


def get_default_impl() -> str:
    if _default_impl is not None:
        return _default_impl
    return check_impl(os.environ.get(IMPL_ENV, "lean"), f"environment variable {IMPL_ENV}")


def set_default_impl(impl: str | None) -> str | None:
    """Set the implementation that modules built from now on use (None: back to the environment/"lean").
    Returns the previous override."""
    global _default_impl
    previous, _default_impl = _default_impl, (None if impl is None else check_impl(impl))
    return previous


def set_impl(module: torch.nn.Module, impl: str) -> None:
    """Switch every Pattention inside `module` (a built model) to `impl`."""
    check_impl(impl)
    for m in module.modules():
        if isinstance(m, _PattentionBase):
            m.impl = impl


def reference_pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         tau: float | torch.Tensor, norm: str = "l2_norm_gelu",
                         group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Θ(x·Kᵀ)·V through plain autograd (keeps A, the scaled scores and Θ(A) for backward)."""
    return normalize_scores(x @ keys.t(), tau, norm, group) @ values


def pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: float | torch.Tensor,
               norm: str = "l2_norm_gelu", group: dist.ProcessGroup | None = None,
               impl: str | None = None) -> torch.Tensor:
    """Θ(x·Kᵀ)·V. With `group`, keys/values are this rank's rows and the result is this rank's partial sum
    (the caller reduces it: all-reduce, or reduce-scatter onto attention partitions).
    `impl`: "lean" or "reference" (None: `get_default_impl()`); both compute the same function."""
    if check_impl(impl or get_default_impl()) == "lean":
        return lean_pattention(x, keys, values, tau, norm, group)
    return reference_pattention(x, keys, values, tau, norm, group)


class _PattentionBase(torch.nn.Module):
    """Shared parameters and τ handling; τ is a buffer kept in fp32 whatever the module's dtype."""

    tau: torch.Tensor

    def __init__(self, d_in: int, d_out: int, n_tokens: int, n_local: int, norm: str,
                 tau: float | None, impl: str | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.n_tokens, self.norm = d_in, d_out, n_tokens, norm
        self.impl = check_impl(impl) if impl is not None else get_default_impl()  # fixed at construction
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
                f"n_local={self.key_tokens.shape[0]}, norm={self.norm}, tau={float(self.tau):.4f}, "
                f"impl={self.impl}")


class Pattention(_PattentionBase):
    """Single-device Pattention: key tokens [n, d_in], value tokens [n, d_out], no bias."""

    def __init__(self, d_in: int, d_out: int, n_tokens: int, norm: str = "l2_norm_gelu",
                 tau: float | None = None, impl: str | None = None) -> None:
        super().__init__(d_in, d_out, n_tokens, n_tokens, norm, tau, impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, self.key_tokens, self.value_tokens, self.tau, self.norm, impl=self.impl)


class ShardedPattention(_PattentionBase):
    """Tensor-parallel Pattention. Sharded axis: the parameter-token axis n (dim 0 of key_tokens and
    value_tokens); rank r owns the contiguous rows [r·n/tp, (r+1)·n/tp). K acts column-parallel, V
    row-parallel (as Megatron's MLP).

    Input: x replicated over the TP group (the caller marks it with copy_to_tensor_model_parallel_region
    or an equivalent gather). Output: this rank's PARTIAL sum over its tokens; the caller reduces it
    (reduce_from_tensor_model_parallel_region, or reduce-scatter onto attention partitions).
    """

    def __init__(self, d_in: int, d_out: int, n_tokens: int, norm: str = "l2_norm_gelu",
                 tau: float | None = None, impl: str | None = None) -> None:
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if n_tokens % self.tp_size:
            raise ValueError(f"{n_tokens} parameter tokens cannot be sharded over tp={self.tp_size}")
        super().__init__(d_in, d_out, n_tokens, n_tokens // self.tp_size, norm, tau, impl)
        for p in (self.key_tokens, self.value_tokens):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        return pattention(x, self.key_tokens, self.value_tokens, self.tau, self.norm, group, self.impl)

    @torch.no_grad()
    def init_master(self, name: str, key_std: float, value_std: float, seed: int) -> None:
        """Copy this rank's rows of the deterministic full-size initialization (TP-independent)."""
        rows = shard_range(self.n_tokens, self.tp_rank, self.tp_size)
        for param, suffix, std, width in ((self.key_tokens, "key_tokens", key_std, self.d_in),
                                          (self.value_tokens, "value_tokens", value_std, self.d_out)):
            full = master_normal(f"{name}.{suffix}", (self.n_tokens, width), std, seed)
            param.copy_(full[rows])
