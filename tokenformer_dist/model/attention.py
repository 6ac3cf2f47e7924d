"""Causal self-attention whose Q, K, V and output projections are ShardedPattentions.

Work is partitioned over (sequence-in-batch, head) pairs instead of heads, so the 12-head OWT models run
at TP 8: with micro-batch b and H heads there are b·H pairs and each TP rank runs attention for b·H/tp of
them. The Q/K/V partial sums are reduce-scattered straight onto those pairs (no all-reduce), attention
runs locally through torch SDPA, and the pairs are all-gathered before the output Pattention.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from tokenformer_dist.model.pattention import ShardedPattention

# apply_rotary_pos_emb reads only these flags; megatron's TransformerConfig would also assert
# heads % tp == 0, which this attention does not need.
_ROPE_FLAGS = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False,
                              mrope_section=None)


def pair_batch_multiple(n_heads: int, tp_size: int) -> int:
    """The micro-batch sizes whose b·H (sequence, head) pairs split evenly over tp are its multiples."""
    return tp_size // math.gcd(n_heads, tp_size)


def check_pair_partition(batch: int, n_heads: int, tp_size: int) -> None:
    """Raise a clear error when b·H (sequence, head) pairs cannot be split evenly over the TP ranks."""
    if batch % (need := pair_batch_multiple(n_heads, tp_size)):
        raise ValueError(
            f"attention partitions (sequence, head) pairs: micro-batch {batch} x {n_heads} heads = "
            f"{batch * n_heads} pairs cannot be split evenly over tp={tp_size}; use a micro-batch size that "
            f"is a multiple of {need}"
        )


class PartitionedCausalAttention(torch.nn.Module):
    """Sharded axes: Q/K/V/output Pattentions shard their parameter tokens (dim 0) over TP ranks; attention
    itself shards the (sequence, head) pairs over TP ranks (each rank owns b·H/tp whole pairs).

    Input x [b, s, d] replicated over the TP group; returns the output Pattention's PARTIAL sum [b, s, d]
    (the block reduces it).
    """

    def __init__(self, d_model: int, n_heads: int, qkv_tokens: int, proj_tokens: int, norm: str,
                 rotary_pct: float, rotary_base: float, qkv_tau: float | None = None,
                 proj_tau: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.query = ShardedPattention(d_model, d_model, qkv_tokens, norm, qkv_tau)
        self.key = ShardedPattention(d_model, d_model, qkv_tokens, norm, qkv_tau)
        self.value = ShardedPattention(d_model, d_model, qkv_tokens, norm, qkv_tau)
        self.proj = ShardedPattention(d_model, d_model, proj_tokens, norm, proj_tau)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_pct, rotary_base=int(rotary_base),
                                      use_cpu_initialization=True) if rotary_pct > 0 else None

    def _to_pairs(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape  # [b, s, H*hd] -> [b*H, s, hd]
        return t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2).reshape(b * self.n_heads, s,
                                                                                  self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        tp = self.query.tp_size
        check_pair_partition(b, self.n_heads, tp)
        # Q, K, V partial sums over this rank's tokens, each [b*H, s, hd]
        q, k, v = self._to_pairs(self.query(x)), self._to_pairs(self.key(x)), self._to_pairs(self.value(x))
        if tp > 1:  # stacked so one reduce-scatter delivers all three (backward: all-gather)
            qkv = reduce_scatter_to_sequence_parallel_region(torch.stack([q, k, v], dim=1))  # [b*H, 3, s, hd]
            q, k, v = qkv.unbind(1)  # each [pairs_local, s, hd]
        if self.rotary is not None:
            freqs = self.rotary(s)  # [s, 1, 1, rot_dim]
            q = apply_rotary_pos_emb(q.transpose(0, 1).unsqueeze(2), freqs, _ROPE_FLAGS).squeeze(2).transpose(0, 1)
            k = apply_rotary_pos_emb(k.transpose(0, 1).unsqueeze(2), freqs, _ROPE_FLAGS).squeeze(2).transpose(0, 1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True)
        out = out.squeeze(1)  # [pairs_local, s, hd]
        if tp > 1:
            # forward: all-gather the pairs; backward: reduce-scatter the output Pattention's partial input
            # grads (each rank's proj shard contributes to every pair), which replaces a copy_to all-reduce.
            out = gather_from_sequence_parallel_region(out.contiguous(), tensor_parallel_output_grad=True)
        out = out.view(b, self.n_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, d)
        return self.proj(out)

    def init_master(self, prefix: str, key_std: float, value_std: float, seed: int) -> None:
        for name in ("query", "key", "value", "proj"):
            getattr(self, name).init_master(f"{prefix}.{name}", key_std, value_std, seed)

