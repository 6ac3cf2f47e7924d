"""FLOP accounting and matched-compute comparisons of the progressive-scaling experiment.

A run's training FLOPs after step k = k · tokens/step · flops.flops_per_token(model) (3 × forward; the
convention of tokenformer_dist/model/flops.py). A ladder's cumulative FLOPs add its stages; a growth step (a few
seconds of CPU copying) costs no training FLOPs. Val curves are compared at equal cumulative FLOPs by linear
interpolation in FLOPs between the trainer's eval points.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenformer_dist.config import Config
from tokenformer_dist.model.flops import flops_per_token

Curve = list[dict[str, Any]]  # points {"step", "tokens", "flops", "val_loss", ...}, in training order

# two-sided 95% quantiles of Student's t by degrees of freedom (1..30); beyond 30 the normal 1.96 is within 2%
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def tokens_per_step(cfg: Config) -> int:
    """One launch of `tp` processes has DP size 1, so a step is micro_batch · grad_accum · seq tokens."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.model.seq_len


def flops_per_step(cfg: Config) -> float:
    return tokens_per_step(cfg) * flops_per_token(cfg.model)


def run_flops(cfg: Config) -> float:
    return cfg.train.steps * flops_per_step(cfg)


def read_curve(run_dir: Path, cfg: Config, flops_before: float = 0.0) -> tuple[Curve, float]:
    """The val curve of a finished run from its metrics.jsonl (FLOPs offset by `flops_before`), and its final
    train loss. Checks that the trainer really ran cfg.train.steps steps of tokens_per_step(cfg) tokens."""
    per_step, fpt = tokens_per_step(cfg), flops_per_token(cfg.model)
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    train_rows = [r for r in rows if "loss" in r]
    steps = cfg.train.steps
    if not train_rows or train_rows[-1]["step"] != steps or train_rows[-1]["tokens"] != steps * per_step:
        raise RuntimeError(f"{path}: expected {steps} steps of {per_step} tokens, the last train record is "
                           f"{train_rows[-1] if train_rows else None}")
    curve = [{"step": r["step"], "tokens": r["step"] * per_step, "flops": flops_before + r["step"] * per_step * fpt,
              "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]
    if not curve or curve[-1]["step"] != steps:
        raise RuntimeError(f"{path}: no validation record at the final step {steps}")
    return curve, train_rows[-1]["loss"]


def loss_at(curve: Curve, flops: float, rel_tol: float = 1e-9) -> float | None:
    """Val loss of `curve` at `flops`, linear in FLOPs between eval points; None outside the curve's span (a
    point within rel_tol of an end counts as that end)."""
    if not curve:
        return None
    tol = rel_tol * max(abs(flops), 1.0)
    if flops < curve[0]["flops"] - tol or flops > curve[-1]["flops"] + tol:
        return None
    if flops <= curve[0]["flops"]:
        return curve[0]["val_loss"]
    for a, b in zip(curve, curve[1:], strict=False):
        if a["flops"] <= flops <= b["flops"]:
            if b["flops"] == a["flops"]:
                return b["val_loss"]
            frac = (flops - a["flops"]) / (b["flops"] - a["flops"])
            return a["val_loss"] + frac * (b["val_loss"] - a["val_loss"])
    return curve[-1]["val_loss"]


def flops_to_reach(curve: Curve, target: float) -> float | None:
    """FLOPs where `curve` FIRST reaches val_loss <= target, linear in FLOPs between eval points; None if never."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None or prev["val_loss"] == point["val_loss"]:
                return point["flops"]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev["flops"] + frac * (point["flops"] - prev["flops"])
        prev = point
    return None


def compute_ratio(ladder_curve: Curve, scratch_curve: Curve) -> float | None:
    """The paper's saving: the ladder's cumulative FLOPs where it first reaches the scratch run's FINAL val loss,
    ÷ the scratch run's FLOPs. None if the ladder never reaches it."""
    reach = flops_to_reach(ladder_curve, scratch_curve[-1]["val_loss"])
    return None if reach is None else reach / scratch_curve[-1]["flops"]


def matched_gain(control: Curve, treated: Curve) -> float:
    """control − treated val loss at the treated curve's final FLOPs (> 0: the treated arm is better at equal
    compute). The control must span that compute."""
    gain = matched_gain_or_none(control, treated)
    if gain is None:
        raise ValueError(f"control curve ends at {control[-1]['flops']:.4g} FLOPs, before {treated[-1]['flops']:.4g}")
    return gain


def matched_gain_or_none(control: Curve, treated: Curve) -> float | None:
    """matched_gain, or None where the control's curve does not span the treated arm's final FLOPs."""
    ref = loss_at(control, treated[-1]["flops"])
    return None if ref is None else ref - treated[-1]["val_loss"]


def post_growth_bumps(stage_curves: Sequence[Curve]) -> list[float]:
    """For each growth: the grown stage's first val loss − the previous stage's final val loss (> 0: the loss
    went up after growing, i.e. compute spent recovering)."""
    return [nxt[0]["val_loss"] - prev[-1]["val_loss"] for prev, nxt in zip(stage_curves, stage_curves[1:],
                                                                          strict=False)]


def mean_ci95(values: Sequence[float]) -> dict[str, Any]:
    """Mean and two-sided 95% Student-t interval over seeds; ci95 is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 of no values")
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def aggregate_or_null(per_seed: Sequence[float | None]) -> dict[str, Any] | None:
    """Mean and interval of per-seed values (compute ratios, gains over scratch); None if any seed has none (a
    "never reached" or "not comparable" cannot be averaged)."""
    if not per_seed or any(x is None for x in per_seed):
        return None
    return {**mean_ci95([x for x in per_seed if x is not None]), "per_seed": list(per_seed)}


def mean_curve(curves: Sequence[Curve], points: int = 60) -> dict[str, list[float]]:
    """Mean and min/max band of several seeds' curves on a common FLOPs grid (log-spaced over the span every
    curve covers), for plotting."""
    lo = max(c[0]["flops"] for c in curves)
    hi = min(c[-1]["flops"] for c in curves)
    if hi <= lo:
        grid = [hi]
    else:
        grid = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    vals = [[loss_at(c, f) for c in curves] for f in grid]
    return {"flops": grid, "mean": [statistics.fmean(v) for v in vals], "min": [min(v) for v in vals],
            "max": [max(v) for v in vals]}
