"""Memory-lean Pattention: one torch.autograd.Function that keeps a single [tokens, n] tensor for backward.

Plain autograd through Θ(X·Kᵀ)·V keeps the scores A, the scaled scores, Θ's output (and GeLU's output for
gelu_l2_norm): three to four [tokens, n] tensors, where n (parameter tokens) is up to ~48x the hidden size.
This Function keeps only
    l2_norm_gelu, gelu_l2_norm: A = X·Kᵀ (compute dtype) and the [tokens, 1] sum of squares (fp32)
    softmax:                    P = softmax(A)·τ² (compute dtype)
plus its inputs (X and the parameters, which exist anyway), and recomputes the elementwise parts (scaling,
GeLU, GeLU') in backward. The matmuls are exactly those of plain autograd: two forward, four backward,
none recomputed. The elementwise parts run in chunks of tokens, so apart from A the only [tokens, n]
allocation alive at a time is one work buffer (forward: Θ's output; backward: Θ's output, then reused
in place for dΘ and dA). Elementwise arithmetic runs in the compute dtype (as the reference's does) and
the row sums in fp32.

Tensor parallelism. Sharded axis: the parameter-token axis n. `keys`/`values` are this rank's rows, A is
[tokens, n/tp] and the output is this rank's PARTIAL sum (the caller reduces it). Θ normalizes over all n
tokens, so
    forward:  one all-reduce (sum) of the [tokens, 1] fp32 normalizer (softmax: plus a detached max);
    backward: one all-reduce (sum) of a [tokens, 1] fp32 tensor, issued inside backward on `group`: the
              normalizer is a global sum that feeds every rank's shard, so its gradient is the sum of the
              contributions of all ranks' shards (the same collective that `all_reduce_sum_both_ways`
              issues in the plain-autograd reference).
Every rank must call backward on the same tensors (as in any TP layer): the collective is in lockstep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tokenformer_dist.config import NORMALIZATIONS

# Elementwise chunks over tokens: at most MAX_CHUNKS of them, so the elementwise temporaries are at most
# 1/MAX_CHUNKS of a [tokens, n] tensor while the number of kernel launches (GPU) and parallel regions (CPU,
# costly when cores are shared) stays small; never below MIN_CHUNK_ELEMENTS, so small layers are one chunk.
MAX_CHUNKS = 4
MIN_CHUNK_ELEMENTS = 1 << 20


def _chunks(n_rows: int, n_cols: int, chunk_tokens: int | None) -> Iterator[slice]:
    step = chunk_tokens or max(-(-n_rows // MAX_CHUNKS), -(-MIN_CHUNK_ELEMENTS // max(1, n_cols)))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and group.size() > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def inverse_norm(sum_sq: torch.Tensor) -> torch.Tensor:
    """1/sqrt(sum_sq), 0 for an all-zero row (as the reference: 0 output and 0 gradient, never NaN)."""
    nonzero = sum_sq > 0
    return torch.where(nonzero, torch.rsqrt(torch.where(nonzero, sum_sq, torch.ones_like(sum_sq))), 0.0)


def _gelu_(t: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(t)  # in place: exact-erf GeLU, the kernel F.gelu uses


def _gelu_backward_(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """grad ← grad·GeLU'(z) in place (the kernel plain autograd uses for F.gelu)."""
    return torch.ops.aten.gelu_backward.grad_input(grad, z, approximate="none", grad_input=grad)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # the meta device (shape-only censuses, planning/census.py) has no autocast to switch off
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _row_sum(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t.sum(-1, keepdim=True, dtype=acc)


class _LeanPattention(torch.autograd.Function):
    """Θ(x·Kᵀ)·V with hand-written backward; see the module docstring for what is kept and communicated.

    Elementwise work runs in the compute dtype on row chunks of one work buffer, in place where possible;
    row sums (normalizers and their gradients) accumulate in fp32 (fp64 for fp64 inputs), like the
    reference's `.float()` sums.
    """

    @staticmethod
    def forward(ctx, x, keys, values, tau, norm, group, compute_dtype, chunk_tokens):
        acc = torch.promote_types(compute_dtype, torch.float32)
        with _autocast_off(x.device.type):  # dtypes are explicit below
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
            scores = x2 @ keys.to(compute_dtype).t()  # A [T, n_local]
            n_rows, n_cols = scores.shape
            tau = tau.to(acc)
            chunks = list(_chunks(n_rows, n_cols, chunk_tokens))
            norm_sum = torch.empty(n_rows, 1, dtype=acc, device=scores.device)
            work = torch.empty_like(scores)  # Θ(A): the only other [T, n] tensor, freed after forward
            if norm == "l2_norm_gelu":
                for r in chunks:
                    norm_sum[r] = _row_sum(scores[r].to(acc).square(), acc)
                scale = (tau * inverse_norm(_all_reduce(norm_sum, group))).to(compute_dtype)
                for r in chunks:
                    _gelu_(torch.mul(scores[r], scale[r], out=work[r]))
            elif norm == "gelu_l2_norm":
                for r in chunks:
                    w = _gelu_(work[r].copy_(scores[r]))
                    norm_sum[r] = _row_sum(w.to(acc).square(), acc)
                scale = (tau * inverse_norm(_all_reduce(norm_sum, group))).to(compute_dtype)
                for r in chunks:
                    work[r].mul_(scale[r])
            else:  # softmax(A)·τ², stabilized by the global row max (detached: it cancels)
                shift = _all_reduce(scores.amax(-1, keepdim=True), group, dist.ReduceOp.MAX)
                for r in chunks:
                    w = torch.sub(scores[r], shift[r], out=work[r]).exp_()
                    norm_sum[r] = _row_sum(w, acc)
                scale = (tau * tau / _all_reduce(norm_sum, group)).to(compute_dtype)
                for r in chunks:
                    work[r].mul_(scale[r])
                scores = None  # P = work is what backward needs; A is dropped
            kept = work if scores is None else scores
            out = work @ values.to(compute_dtype)
        ctx.save_for_backward(x, keys, values, kept, norm_sum, tau)
        ctx.norm, ctx.group, ctx.compute_dtype, ctx.chunks = norm, group, compute_dtype, chunks
        return out.reshape(*x.shape[:-1], values.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, keys, values, kept, norm_sum, tau = ctx.saved_tensors
        norm, group, cdt, chunks = ctx.norm, ctx.group, ctx.compute_dtype, ctx.chunks
        need_x, need_k, need_v = ctx.needs_input_grad[:3]
        acc = norm_sum.dtype
        grad_x = grad_k = grad_v = None
        with _autocast_off(x.device.type):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(cdt)  # [T, d_out]
            v = values.to(cdt)
            if norm == "softmax":
                probs = kept
                if need_v:
                    grad_v = probs.t() @ g
                if need_x or need_k:
                    work = g @ v.t()  # dP
                    dot = torch.empty_like(norm_sum)
                    for r in chunks:
                        dot[r] = _row_sum(work[r] * probs[r], acc)
                    # Σ over ALL n tokens: the one TP collective of backward
                    dot = (_all_reduce(dot, group) / (tau * tau)).to(cdt)
                    for r in chunks:  # dA = P ⊙ (dP − Σ dP⊙P / τ²)
                        work[r].sub_(dot[r]).mul_(probs[r])
            else:
                scores = kept
                inv = inverse_norm(norm_sum)
                scale = (tau * inv).to(cdt)
                gelu_first = norm == "gelu_l2_norm"
                work = torch.empty_like(scores)
                if need_v:  # recompute Θ(A) for dV = Θ(A)ᵀ·g
                    for r in chunks:
                        if gelu_first:
                            _gelu_(work[r].copy_(scores[r])).mul_(scale[r])
                        else:
                            _gelu_(torch.mul(scores[r], scale[r], out=work[r]))
                    grad_v = work.t() @ g
                if need_x or need_k:
                    torch.matmul(g, v.t(), out=work)  # dΘ, written over Θ(A)
                    d_scale = torch.empty_like(norm_sum)
                    for r in chunks:
                        a, w = scores[r], work[r]
                        if gelu_first:  # Θ = G·scale, G = GeLU(A): d_scale = Σ dΘ⊙G
                            d_scale[r] = _row_sum(w * F.gelu(a), acc)
                        else:  # Θ = GeLU(Z), Z = A·scale: dZ = GeLU'(Z)·dΘ (in place), d_scale = Σ dZ⊙A
                            d_scale[r] = _row_sum(_gelu_backward_(w, a * scale[r]) * a, acc)
                    # scale = τ·(Σ s²)^(-1/2), s = A or G: d(Σ s²) = d_scale·(−τ/2)·inv³ (0 for zero rows).
                    # Σ s² runs over ALL ranks' tokens, so its gradient is the sum of every rank's part.
                    d_sum2 = (2 * _all_reduce(d_scale * (-0.5 * tau) * inv.pow(3), group)).to(cdt)
                    for r in chunks:
                        a, w = scores[r], work[r]
                        if gelu_first:  # dG = dΘ·scale + 2G·d_sum, then dA = GeLU'(A)·dG
                            _gelu_backward_(w.mul_(scale[r]).addcmul_(F.gelu(a), d_sum2[r]), a)
                        else:  # dA = dZ·scale + 2A·d_sum
                            w.mul_(scale[r]).addcmul_(a, d_sum2[r])
            if need_x:
                grad_x = (work @ keys.to(cdt)).view(x.shape).to(x.dtype)
            if need_k:
                grad_k = (work.t() @ x.reshape(-1, x.shape[-1]).to(cdt)).to(keys.dtype)
            if grad_v is not None:
                grad_v = grad_v.to(values.dtype)
        return grad_x, grad_k, grad_v, None, None, None, None, None


def lean_pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: float | torch.Tensor,
                    norm: str = "l2_norm_gelu", group: dist.ProcessGroup | None = None,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """Θ(x·Kᵀ)·V, numerically the plain-autograd `reference_pattention`, keeping one [tokens, n] tensor.

    x [..., d_in]; keys [n_local, d_in]; values [n_local, d_out]. With `group`, keys/values are this rank's
    rows and the result is this rank's partial sum. Under torch.autocast the matmuls and the kept tensor use
    the autocast dtype; normalizers are always fp32. `chunk_tokens` overrides the elementwise chunk rows.
    """
    if norm not in NORMALIZATIONS:
        raise ValueError(f"unknown Pattention normalization {norm!r}; valid: {', '.join(NORMALIZATIONS)}")
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(x.dtype, keys.dtype)
    # a Python float τ stays exact (fp64) until it meets the accumulation dtype
    tau_t = (tau.detach() if isinstance(tau, torch.Tensor)
             else torch.tensor(tau, dtype=torch.float64, device=x.device))
    return _LeanPattention.apply(x, keys, values, tau_t, norm, group, compute_dtype, chunk_tokens)
