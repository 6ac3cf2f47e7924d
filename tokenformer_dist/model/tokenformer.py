"""TokenFormer: a Transformer whose every linear projection is a (sharded) Pattention.

    tokens ─ VocabParallelEmbedding ─┬─ L × block ─ LayerNorm(γ, β) ─ logits = h·Eᵀ (tied, vocab-sharded)
    block(x):  x = x + proj(attn(Q(h), K(h), V(h)))   h = LN(x)  (LN without γ/β, eps 1e-5)
               x = x + ffn(LN(x))                     ffn = ONE Pattention, no other activation

Rotary position embedding on 25% of each head's dims, causal attention through SDPA, no biases, dropout 0.
Init: key tokens and embedding N(0, 0.02); value tokens N(0, 2/(L·√d)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch.utils.checkpoint import checkpoint

from tokenformer_dist.config import ModelConfig
from tokenformer_dist.model.attention import PartitionedCausalAttention
from tokenformer_dist.model.init import master_normal, value_init_std
from tokenformer_dist.model.pattention import ShardedPattention
from tokenformer_dist.sharding import shard_range


class TokenFormerBlock(torch.nn.Module):
    """Pre-LN block. Sharded axes: every Pattention's parameter tokens over TP (see ShardedPattention);
    attention over (sequence, head) pairs. Input and output x [b, s, d] are replicated over the TP group."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model, self.eps = cfg.d_model, cfg.ln_eps
        self.attn = PartitionedCausalAttention(cfg.d_model, cfg.n_heads, cfg.qkv_tokens, cfg.proj_tokens,
                                               cfg.norm, cfg.rotary_pct, cfg.rotary_base)
        self.ffn = ShardedPattention(cfg.d_model, cfg.d_model, cfg.ffn_tokens, cfg.norm)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d_model,), eps=self.eps)  # non-parametric: no γ, β

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # copy_to: identity forward, all-reduce of the input grads backward (the Pattentions hold shards)
        x = x + reduce_from_tensor_model_parallel_region(self.attn(copy_to_tensor_model_parallel_region(self._norm(x))))
        x = x + reduce_from_tensor_model_parallel_region(self.ffn(copy_to_tensor_model_parallel_region(self._norm(x))))
        return x


class TokenFormer(torch.nn.Module):
    """The language model. Sharded axes: embedding rows (vocabulary) over TP, shared with the output layer;
    Pattention parameter tokens over TP; the final LayerNorm is replicated.

    forward(tokens [b, s]) -> this rank's vocab-shard logits [b, s, V/tp]; with labels -> mean token loss.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 1234, activation_checkpointing: bool = False,
                 init: bool = True) -> None:
        """init=False leaves the parameters uninitialised (torch.empty), for callers that load weights next:
        the master init draws every full-size tensor on every rank."""
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            use_cpu_initialization=True, perform_initialization=False, params_dtype=torch.float32,
        )
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model,
                                                init_method=torch.nn.init.zeros_, config=mp_config)
        if not hasattr(self.embedding.weight, "tensor_model_parallel"):  # megatron sets it only when it inits
            set_tensor_model_parallel_attributes(self.embedding.weight, is_parallel=True, dim=0, stride=1)
        self.blocks = torch.nn.ModuleList(TokenFormerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = torch.nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        if init:
            self.init_master(seed)

    @torch.no_grad()
    def init_master(self, seed: int) -> None:
        """Official init, drawn per parameter name so that every TP degree gets the same master weights."""
        cfg = self.cfg
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        full = master_normal("embedding.weight", (cfg.vocab_size, cfg.d_model), cfg.init_std, seed)
        self.embedding.weight.copy_(full[shard_range(cfg.vocab_size, tp_rank, tp_size)])
        value_std = value_init_std(cfg.n_layers, cfg.d_model)
        for i, block in enumerate(self.blocks):
            block.attn.init_master(f"blocks.{i}.attn", cfg.init_std, value_std, seed)
            block.ffn.init_master(f"blocks.{i}.ffn", cfg.init_std, value_std, seed)
        self.final_norm.reset_parameters()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(tokens)  # [b, s, d], all-reduced over the vocab shards
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        h = copy_to_tensor_model_parallel_region(self.final_norm(x))
        logits = h @ self.embedding.weight.t()  # [b, s, V/tp]: tied output layer, vocab-sharded
        if labels is None:
            return logits
        return self.token_losses(logits, labels).mean()

    @staticmethod
    def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [b, s] (fp32) from vocab-sharded logits, which are left unchanged."""
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            # the whole vocabulary on one rank: torch's fused log-softmax kernel, same function with fewer
            # passes over the [b, s, V] logits than megatron's sharded formula (P5, docs/training.md)
            flat = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
            return flat.view(labels.shape)
        # megatron's formula overwrites its input with softmax in place (and .float() of fp32 logits is the
        # same tensor): copy, so that callers keep their logits
        return vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels)

    @staticmethod
    def gather_logits(logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, s, V] from the vocab shards (for tests and generation)."""
        return gather_from_tensor_model_parallel_region(logits)
