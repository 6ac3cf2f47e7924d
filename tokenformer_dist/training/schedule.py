"""Learning-rate schedule: linear warmup, then cosine decay to min_lr (the paper's defaults)."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_frac: float) -> float:
    """LR for optimizer step `step` (0-based). Warmup over ceil(warmup_frac·total) steps, then cosine.

    A pure function of the step, so resuming needs no scheduler state.
    """
    warmup = math.ceil(warmup_frac * total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if total_steps <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
