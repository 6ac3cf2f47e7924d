"""Deterministic master-weight initialization.

Every parameter's full (unsharded) value is drawn from a generator seeded by (seed, parameter name), and each
tensor-parallel rank copies out its own rows. The same seed therefore gives the same model at any TP degree,
which is what the TP-invariance tests and the resharding tool rely on.
"""

from __future__ import annotations

import math
import zlib

import torch


def master_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """The full fp32 tensor N(0, std^2) for parameter `name`, independent of TP degree and creation order."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)


def value_init_std(n_layers: int, d_model: int) -> float:
    """GPT-NeoX "wang_init" used by the official code for value tokens: 2 / (L * sqrt(d))."""
    return 2.0 / (n_layers * math.sqrt(d_model))
