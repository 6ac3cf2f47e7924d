"""Pattention: token-parameter attention, Θ(X·Kᵀ)·V — one function, one module, single-device or TP.

The math lives in `pattention()`; every path calls it. `Pattention` is a plain torch module: built alone it
runs on one device with no process group. `model.tensor_parallel.parallelize()` later gives it a TP group and
keeps only this rank's parameter-token rows; the only extra communication inside the math is then one
all-reduce of a [tokens, 1] fp32 tensor: Θ normalizes over all n parameter tokens, not the local n/tp.

Two implementations of the same function (`impl`, from the config field `model.pattention_impl`):
  "lean"      (default) — keeps one [tokens, n] tensor for backward and recomputes the elementwise parts.
              Eager: `lean.lean_pattention`, a torch.autograd.Function with hand-written, chunked backward.
              Under torch.compile: `compiled_lean_pattention`, the plain formula inside a selective
              checkpoint that tells the compiler's partitioner to keep only the matmul outputs and the row
              sums, so the normalization and its backward become a few fused kernels with the same saved set;
  "reference" — `reference_pattention`, plain autograd through `normalize_scores`: the readable math and
              what the tests compare the lean path against.
A module takes `impl=` at construction; `set_impl(model, impl)` switches a built model.

Nothing here imports megatron-core.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tokenformer_dist.config import PATTENTION_IMPLS
from tokenformer_dist.model.lean import inverse_norm, lean_pattention
from tokenformer_dist.model.mappings import all_reduce_max_no_grad, all_reduce_sum_both_ways


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


def check_impl(impl: str) -> str:
    if impl not in PATTENTION_IMPLS:
        raise ValueError(f"unknown Pattention implementation {impl!r}; valid: {', '.join(PATTENTION_IMPLS)}")
    return impl


def set_impl(module: torch.nn.Module, impl: str) -> None:
    """Switch every Pattention inside `module` (a built model) to `impl`."""
    check_impl(impl)
    for m in module.modules():
        if isinstance(m, Pattention):
            m.impl = impl


def reference_pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         tau: float | torch.Tensor, norm: str = "l2_norm_gelu",
                         group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Θ(x·Kᵀ)·V through plain autograd (keeps A, the scaled scores and Θ(A) for backward)."""
    return normalize_scores(x @ keys.t(), tau, norm, group) @ values


# What the compiled lean path keeps for backward: matmul outputs (the scores A = X·Kᵀ; the output Θ·V is
# not needed by backward, so keeping it costs nothing) and the [tokens, 1] row sums. Everything else — the
# fp32 casts, squares, scale and GeLU — is recomputed inside the backward's fused kernels.
_KEPT_BY_COMPILED_LEAN = frozenset({torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
                                    torch.ops.aten.sum.dim_IntList})


def _keep_matmuls_and_row_sums(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_BY_COMPILED_LEAN else CheckpointPolicy.MUST_RECOMPUTE


def compiled_lean_pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             tau: float | torch.Tensor, norm: str = "l2_norm_gelu",
                             group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The lean path as torch.compile should see it: `reference_pattention` inside a selective checkpoint.

    Traced whole, the lean Function's chunk loops and in-place buffers would only fragment the graph; and
    the compiler's default partitioner, left alone, keeps Θ(A) as well as A (two [tokens, n] tensors). The
    checkpoint policy pins the saved set to the lean Function's (A and the row sums) and lets the compiler
    fuse the normalization and its recomputation in backward. Used only while compiling."""
    return checkpoint(reference_pattention, x, keys, values, tau, norm, group, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_matmuls_and_row_sums))


def pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: float | torch.Tensor,
               norm: str = "l2_norm_gelu", group: dist.ProcessGroup | None = None,
               impl: str = "lean") -> torch.Tensor:
    """Θ(x·Kᵀ)·V. With `group`, keys/values are this rank's rows and the result is this rank's partial sum
    (the caller reduces it: all-reduce, or reduce-scatter onto attention partitions).
    `impl`: "lean" or "reference"; both compute the same function."""
    if check_impl(impl) == "lean":
        if torch.compiler.is_compiling():
            return compiled_lean_pattention(x, keys, values, tau, norm, group)
        return lean_pattention(x, keys, values, tau, norm, group)
    return reference_pattention(x, keys, values, tau, norm, group)


class Pattention(torch.nn.Module):
    """Key tokens [n, d_in], value tokens [n, d_out], no bias; τ a buffer kept in fp32 whatever the dtype.

    Sharded axis under TP (after `parallelize`): the parameter-token axis n (dim 0 of key_tokens and
    value_tokens, as `sharding.RULES` says); rank r owns the contiguous rows [r·n/tp, (r+1)·n/tp), K acting
    column-parallel and V row-parallel (as Megatron's MLP). Input x replicated over the TP group; output this
    rank's PARTIAL sum over its tokens, which the caller reduces. Single device: `tp_group` None, all n rows.
    """

    tau: torch.Tensor

    def __init__(self, d_in: int, d_out: int, n_tokens: int, norm: str = "l2_norm_gelu",
                 tau: float | None = None, impl: str = "lean") -> None:
        super().__init__()
        self.d_in, self.d_out, self.n_tokens, self.norm = d_in, d_out, n_tokens, norm
        self.impl = check_impl(impl)
        self.tp_group: dist.ProcessGroup | None = None  # set by parallelize(); None: one device
        self.key_tokens = torch.nn.Parameter(torch.zeros(n_tokens, d_in))
        self.value_tokens = torch.nn.Parameter(torch.zeros(n_tokens, d_out))
        self.initial_tau = math.sqrt(n_tokens) if tau is None else float(tau)  # √n of the layer as built
        self.register_buffer("tau", torch.tensor(self.initial_tau, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, self.key_tokens, self.value_tokens, self.tau, self.norm, self.tp_group, self.impl)

    @torch.no_grad()
    def reset_constants(self) -> None:
        """τ back to its value at construction (after `to_empty`; a checkpoint's τ is loaded over it)."""
        self.tau.fill_(self.initial_tau)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.tau = self.tau.float()  # τ is a constant of the function, not a weight: never bf16
        return self

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_tokens={self.n_tokens}, "
                f"n_local={self.key_tokens.shape[0]}, norm={self.norm}, tau={float(self.tau):.4f}, "
                f"impl={self.impl}")
