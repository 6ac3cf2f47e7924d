"""`python -m tokenformer_dist.train ... --profile N`: a torch.profiler trace of N training steps.

After `WARMUP_STEPS` steps of this invocation (compilation, allocator growth and the first optimizer step
are over by then), the next N steps are profiled; training then goes on unprofiled. Each rank writes

    <run-dir>/profile/rank{r}.<timestamp>.pt.trace.json   Chrome trace, also what TensorBoard's profiler
                                                          plugin reads (`tensorboard --logdir <run-dir>/profile`)
    <run-dir>/profile/summary_rank{r}.json                the figures printed below, for scripts

and rank 0 prints the top kernels by device time (on CPU: the top operators by self CPU time, the CPU being
the device) and, on GPU, the device idle fraction: the share of the profiled steps' wall time during which
no kernel ran on this rank's GPU — a host-bound step shows up as a large idle fraction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from tokenformer_dist.atomic import atomic_write_text

WARMUP_STEPS = 3  # steps run before the profiler starts recording (plus one profiler warm-up step)
TOP = 15  # rows of the printed table


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Share of [start, end] covered by the union of `intervals` (µs): kernels overlap on several streams."""
    if end <= start:
        return 0.0
    covered, reach = 0.0, start
    for lo, hi in sorted((max(lo, start), min(hi, end)) for lo, hi in intervals):
        if hi <= reach:
            continue
        covered += hi - max(lo, reach)
        reach = hi
    return covered / (end - start)


def summarize(events: EventList, on_gpu: bool, top: int = TOP) -> dict[str, Any]:
    """Top kernels (GPU) or operators (CPU) by self device time over the profiled steps, and on GPU the idle
    fraction of the device between the first and the last profiled step's boundaries."""
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    if on_gpu:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name: dict[str, list[float]] = {}
        for k in kernels:
            by_name.setdefault(k.name, []).append(k.time_range.elapsed_us())
        rows = sorted(((name, sum(t), len(t)) for name, t in by_name.items()), key=lambda r: -r[1])
        start = min((s.time_range.start for s in steps), default=0.0)
        end = max((s.time_range.end for s in steps), default=0.0)
        busy = busy_fraction([(k.time_range.start, k.time_range.end) for k in kernels], start, end)
        n_kernels = len(kernels)
        idle: float | None = 1.0 - busy
    else:
        averages = events.key_averages()
        rows = sorted(((a.key, a.self_cpu_time_total, a.count) for a in averages if not a.key.startswith(
            "ProfilerStep")), key=lambda r: -r[1])
        n_kernels, idle = None, None
    total = sum(r[1] for r in rows) or 1.0
    return {
        "device": "cuda" if on_gpu else "cpu",
        "steps": len(steps),
        "kernels_per_step": n_kernels / max(len(steps), 1) if n_kernels is not None else None,
        "device_idle_fraction": idle,
        "top": [{"name": name, "self_ms": t / 1e3, "share": t / total, "calls": n} for name, t, n in rows[:top]],
    }


def format_summary(s: dict[str, Any]) -> str:
    what = "kernels by device time" if s["device"] == "cuda" else "operators by self CPU time"
    lines = [f"profile: {s['steps']} steps; top {what}:"]
    lines += [f"  {r['self_ms']:10.2f} ms {r['share']:6.1%} {r['calls']:7d}x  {r['name'][:100]}" for r in s["top"]]
    if s["device_idle_fraction"] is not None:
        lines.append(f"profile: device idle {s['device_idle_fraction']:.1%} of the profiled steps' wall time; "
                     f"{s['kernels_per_step']:.0f} kernels per step")
    return "\n".join(lines)


class StepProfiler:
    """Call `step()` after every training step; records steps WARMUP_STEPS+2 .. WARMUP_STEPS+1+N of this
    invocation, then writes the trace and the summary (see the module docstring)."""

    def __init__(self, n_steps: int, run_dir: Path, rank: int, on_gpu: bool, say=print) -> None:
        self.out = Path(run_dir) / "profile"
        self.out.mkdir(parents=True, exist_ok=True)
        self.rank, self.on_gpu, self.say = rank, on_gpu, say
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        self.prof = profile(activities=activities,
                            schedule=schedule(wait=WARMUP_STEPS, warmup=1, active=n_steps, repeat=1),
                            on_trace_ready=self._ready)
        self.prof.start()
        self.done = False

    def _ready(self, prof: profile) -> None:
        tensorboard_trace_handler(str(self.out), worker_name=f"rank{self.rank}")(prof)
        summary = summarize(prof.events(), self.on_gpu)
        atomic_write_text(self.out / f"summary_rank{self.rank}.json", json.dumps(summary, indent=1))
        if self.rank == 0:
            self.say(format_summary(summary))
        self.done = True

    def step(self) -> None:
        if self.done:
            return
        self.prof.step()
        if self.done:
            self.prof.stop()

    def close(self) -> None:
        """The run ended before the profiled steps were over: whatever was recorded is written."""
        if not self.done:
            self.prof.stop()
            self.done = True
