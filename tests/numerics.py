"""The relative error every numeric test compares with its tolerance (one definition, numbers and tensors)."""

from __future__ import annotations

import torch


def rel(a: float | torch.Tensor, b: float | torch.Tensor) -> float:
    """|a − b| / |b| for numbers; for tensors the largest error over the largest reference value."""
    if isinstance(a, torch.Tensor):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return abs(a - b) / max(abs(b), 1e-30)
