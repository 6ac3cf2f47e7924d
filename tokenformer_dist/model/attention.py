"""Causal self-attention whose Q, K, V and output projections are Pattentions (plain torch: no megatron).

Work is partitioned over (sequence-in-batch, head) pairs instead of heads, so the 12-head OWT models run
at TP 8: with micro-batch b and H heads there are b·H pairs and each TP rank runs attention for b·H/tp of
them. The Q/K/V partial sums are reduce-scattered straight onto those pairs (no all-reduce), attention
runs locally through torch SDPA, and the pairs are all-gathered before the output Pattention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenformer_dist.model.mappings import SINGLE_DEVICE, TensorParallelRegions
from tokenformer_dist.model.pattention import Pattention


class Rotary(torch.nn.Module):
    """Rotary position embedding on the first `dim` dims of each head (non-interleaved halves), the
    arithmetic of megatron-core's RotaryEmbedding + apply_rotary_pos_emb: inverse frequencies computed in
    fp32 on the CPU, angles on the input's device, cos/sin cast to the input dtype.

    `inv_freq` is a non-persistent fp32 buffer (not in the state_dict): it follows the model to its device
    once, instead of a host-to-device copy per call, and stays fp32 when the model is cast to bf16."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, rotary_pct: float, base: float) -> None:
        super().__init__()
        self.dim = int(head_dim * rotary_pct) if rotary_pct < 1.0 else head_dim
        self.base = base
        # computed on the CPU (megatron's arithmetic), then placed where the module is being built
        self.register_buffer("inv_freq", self._inverse_frequencies().to(torch.get_default_device()),
                             persistent=False)

    def _inverse_frequencies(self) -> torch.Tensor:
        return 1.0 / (int(self.base) ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device="cpu")
                                         / self.dim))

    @torch.no_grad()
    def reset_constants(self) -> None:
        """inv_freq recomputed (after `to_empty`, which leaves buffers uninitialized)."""
        self.inv_freq.copy_(self._inverse_frequencies())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()  # a constant of the function, not a weight: never bf16
        return self

    def forward(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """t [..., s, head_dim] -> the same with positions offset..offset+s-1 rotated in."""
        s = t.shape[-2]
        inv_freq = self.inv_freq
        freqs = torch.outer(torch.arange(offset, offset + s, device=t.device, dtype=inv_freq.dtype), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)  # [s, dim]
        rot, passed = t[..., :self.dim], t[..., self.dim:]
        x1, x2 = torch.chunk(rot, 2, dim=-1)
        rot = rot * torch.cos(angles).to(t.dtype) + torch.cat((-x2, x1), dim=-1) * torch.sin(angles).to(t.dtype)
        return torch.cat((rot, passed), dim=-1)


def pair_batch_multiple(n_heads: int, tp_size: int) -> int:
    """The micro-batch sizes whose b·H (sequence, head) pairs split evenly over tp are its multiples."""
    return tp_size // math.gcd(n_heads, tp_size)


class KVCache:
    """Every attention layer's rotated keys and values so far, preallocated for `max_len` positions, so that
    generation runs one new position per token instead of the whole prefix (Pattention layers need no cache:
    their keys and values are parameters). Under TP each rank holds only its own (sequence, head) pairs.

    The protocol is transformers' (`update(keys, values, layer_idx)` -> the whole sequence so far;
    `get_seq_length(layer_idx)`), so the exported Hugging Face model hands its DynamicCache to the same code.
    Tensors are [..., positions, head_dim].
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if self.keys[layer_idx] is None:
            shape = (*k.shape[:-2], self.max_len, k.shape[-1])
            self.keys[layer_idx], self.values[layer_idx] = k.new_empty(shape), v.new_empty(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[..., start:end, :], values[..., start:end, :] = k, v
        self.lengths[layer_idx] = end
        return keys[..., :end, :], values[..., :end, :]


def check_pair_partition(batch: int, n_heads: int, tp_size: int) -> None:
    """Raise a clear error when b·H (sequence, head) pairs cannot be split evenly over the TP ranks."""
    if batch % (need := pair_batch_multiple(n_heads, tp_size)):
        raise ValueError(
            f"attention partitions (sequence, head) pairs: micro-batch {batch} x {n_heads} heads = "
            f"{batch * n_heads} pairs cannot be split evenly over tp={tp_size}; use a micro-batch size that "
            f"is a multiple of {need}"
        )


class PartitionedCausalAttention(torch.nn.Module):
    """Sharded axes (after `parallelize`): Q/K/V/output Pattentions shard their parameter tokens (dim 0) over
    TP ranks; attention itself shards the (sequence, head) pairs over TP ranks (each rank owns b·H/tp whole
    pairs). Single device (`tp` the identity regions): one rank owns every pair.

    Input x [b, s, d] replicated over the TP group; returns the output Pattention's PARTIAL sum [b, s, d]
    (the block reduces it).
    """

    def __init__(self, d_model: int, n_heads: int, qkv_tokens: int, proj_tokens: int, norm: str,
                 rotary_pct: float, rotary_base: float, qkv_tau: float | None = None,
                 proj_tau: float | None = None, impl: str = "lean") -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.tp: TensorParallelRegions = SINGLE_DEVICE  # parallelize() binds it to a TP group
        self.query = Pattention(d_model, d_model, qkv_tokens, norm, qkv_tau, impl)
        self.key = Pattention(d_model, d_model, qkv_tokens, norm, qkv_tau, impl)
        self.value = Pattention(d_model, d_model, qkv_tokens, norm, qkv_tau, impl)
        self.proj = Pattention(d_model, d_model, proj_tokens, norm, proj_tau, impl)
        self.rotary = Rotary(self.head_dim, rotary_pct, rotary_base) if rotary_pct > 0 else None

    def _to_pairs(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape  # [b, s, H*hd] -> [b*H, s, hd]
        return t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2).reshape(b * self.n_heads, s,
                                                                                  self.head_dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        """With `cache` (generation): x holds the new positions only; their keys and values are appended to
        the cache and they attend to everything cached before them."""
        b, s, d = x.shape
        tp = self.tp.size
        check_pair_partition(b, self.n_heads, tp)
        # Q, K, V partial sums over this rank's tokens, each [b*H, s, hd]
        q, k, v = self._to_pairs(self.query(x)), self._to_pairs(self.key(x)), self._to_pairs(self.value(x))
        if tp > 1:  # stacked so one reduce-scatter delivers all three (backward: all-gather)
            qkv = self.tp.reduce_scatter_first_dim(torch.stack([q, k, v], dim=1))  # [b*H, 3, s, hd]
            q, k, v = qkv.unbind(1)  # each [pairs_local, s, hd]
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, past), self.rotary(k, past)
        mask = None
        if cache is None:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # one head per pair
        else:
            # cached as [b, H, positions, hd] on one device (transformers' layout), [1, pairs_local, ...] under TP
            lead = (b, self.n_heads) if tp == 1 else (1, q.shape[0])
            q, k, v = (t.reshape(*lead, s, self.head_dim) for t in (q, k, v))
            k, v = cache.update(k, v, layer_idx)  # everything so far: [*lead, past + s, hd]
            if past and s > 1:  # new position i sees the cached positions and the new ones up to i
                mask = torch.ones(s, past + s, dtype=torch.bool, device=q.device).tril(past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0 and s > 1)
        out = out.reshape(-1, s, self.head_dim)  # [pairs_local, s, hd]
        if tp > 1:
            # forward: all-gather the pairs; backward: reduce-scatter the output Pattention's partial input
            # grads (each rank's proj shard contributes to every pair), which replaces a copy_to all-reduce.
            out = self.tp.gather_first_dim(out.contiguous())
        out = out.view(b, self.n_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, d)
        return self.proj(out)
