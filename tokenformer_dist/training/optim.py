"""The optimizer: torch AdamW with the usual decay groups."""

from __future__ import annotations

import torch

from tokenformer_dist.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config, fused: bool) -> torch.optim.Optimizer:
    """torch AdamW (fused on GPU; DeepSpeed's FusedAdam JIT-compiles on CPU). No decay on LayerNorm γ/β."""
    t = cfg.train
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=fused or None)
