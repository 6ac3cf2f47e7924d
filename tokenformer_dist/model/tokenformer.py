"""TokenFormer: a Transformer whose every linear projection is a Pattention.

    tokens ─ embedding ─┬─ L × block ─ LayerNorm(γ, β) ─ logits = h·Eᵀ (tied)
    block(x):  x = x + proj(attn(Q(h), K(h), V(h)))   h = LN(x)  (LN without γ/β, eps 1e-5)
               x = x + ffn(LN(x))                     ffn = ONE Pattention, no other activation

Rotary position embedding on 25% of each head's dims, causal attention through SDPA, no biases, dropout 0.
Init: key tokens and embedding N(0, 0.02); value tokens N(0, 2/(L·√d)), drawn per parameter name.

Plain torch: `TokenFormer(cfg)` builds and runs on one device with no process group and nothing from
megatron-core. Tensor parallelism is a separate step, `model.tensor_parallel.parallelize(model, tp_group)`, which
keeps this rank's rows of every sharded tensor (sharding.RULES), swaps in megatron-core's vocab-parallel
embedding and binds the modules' `tp` regions to the group; the trainer applies it. The forward code is the
same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tokenformer_dist.config import ModelConfig
from tokenformer_dist.distributed.sharding import full_shape, local_part
from tokenformer_dist.model.attention import KVCache, PartitionedCausalAttention
from tokenformer_dist.model.init import master_normal, value_init_std
from tokenformer_dist.model.mappings import SINGLE_DEVICE, TensorParallelRegions
from tokenformer_dist.model.pattention import Pattention


class TokenFormerBlock(torch.nn.Module):
    """Pre-LN block. Sharded axes (after `parallelize`): every Pattention's parameter tokens over TP;
    attention over (sequence, head) pairs. Input and output x [b, s, d] are replicated over the TP group."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model, self.eps = cfg.d_model, cfg.ln_eps
        self.tp: TensorParallelRegions = SINGLE_DEVICE
        self.attn = PartitionedCausalAttention(cfg.d_model, cfg.n_heads, cfg.qkv_tokens, cfg.proj_tokens,
                                               cfg.norm, cfg.rotary_pct, cfg.rotary_base,
                                               impl=cfg.pattention_impl)
        self.ffn = Pattention(cfg.d_model, cfg.d_model, cfg.ffn_tokens, cfg.norm, impl=cfg.pattention_impl)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d_model,), eps=self.eps)  # non-parametric: no γ, β

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        # copy_to: identity forward, all-reduce of the input grads backward (the Pattentions hold shards)
        x = x + self.tp.reduce_from(self.attn(self.tp.copy_to(self._norm(x)), cache, layer_idx))
        x = x + self.tp.reduce_from(self.ffn(self.tp.copy_to(self._norm(x))))
        return x


class TokenFormer(torch.nn.Module):
    """The language model. Sharded axes (after `parallelize`): embedding rows (vocabulary) over TP, shared
    with the output layer; Pattention parameter tokens over TP; the final LayerNorm is replicated.

    forward(tokens [b, s]) -> logits [b, s, V] (under TP: this rank's vocab shard [b, s, V/tp]);
    with labels -> mean token loss. `init_weights=False` skips the random init (weights loaded next).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 1234, activation_checkpointing: bool = False,
                 init_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.tp: TensorParallelRegions = SINGLE_DEVICE  # parallelize() binds it to a TP group
        self.embedding = torch.nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.zeros(cfg.vocab_size,
                                                                                             cfg.d_model))
        self.blocks = torch.nn.ModuleList(TokenFormerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = torch.nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        if init_weights:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Official init, each full tensor drawn per (seed, parameter name) and this rank's part of it kept
        (sharding table), so that every TP degree gets the same master weights."""
        cfg = self.cfg
        value_std = value_init_std(cfg.n_layers, cfg.d_model)
        for name, p in self.named_parameters():
            if name.startswith("final_norm."):
                continue
            std = value_std if name.endswith(".value_tokens") else cfg.init_std
            full = master_normal(name, full_shape(name, tuple(p.shape), self.tp.size), std, seed)
            p.copy_(local_part(name, full, self.tp.rank, self.tp.size))
        self.final_norm.reset_parameters()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """With `cache` (generation, see KVCache): `tokens` are the positions after the cached ones."""
        x = self.embedding(tokens)  # [b, s, d] (under TP: all-reduced over the vocab shards)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            elif cache is None:
                x = block(x)  # no layer index: a compiled block would be specialized (recompiled) per index
            else:
                x = block(x, cache, i)
        # the tied weight is read here, not inside head(): ZeRO 3 gathers a parameter used outside its own
        # module on attribute access, which a compiled head() would not perform
        return self.head(x, self.embedding.weight, labels)

    def head(self, x: torch.Tensor, output_weight: torch.Tensor,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        """Final LayerNorm, tied output layer (`output_weight` = the embedding's [V/tp, d]) -> logits
        [b, s, V/tp]; with labels -> mean token loss. A method of its own so that it compiles as one region."""
        h = self.tp.copy_to(self.final_norm(x))
        logits = h @ output_weight.t()  # [b, s, V/tp]: tied output layer
        if labels is None:
            return logits
        return self.token_losses(logits, labels).mean()

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [b, s] (fp32) from this model's (vocab-shard) logits, left unchanged."""
        return self.tp.token_losses(logits, labels)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, s, V] from the vocab shards (for tests and generation)."""
        return self.tp.gather_last_dim(logits)
