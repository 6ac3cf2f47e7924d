#!/usr/bin/env python
"""Loss curve of one or more runs: RUN/metrics.jsonl -> PNG.

    python tools/plot_metrics.py RUN [RUN ...] [--out loss.png] [--x step|tokens]

Training loss per logged step (and validation loss where logged), one colour per run. The PNG is written
to a temp name and renamed. Default output: RUN/loss.png for one run, ./loss.png for several.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenformer_dist.atomic import atomic_path
from tokenformer_dist.cli import ArgumentParser


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise ValueError(f"{path}: no metrics.jsonl (expected a run directory or a metrics.jsonl file)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path}:{i}: not a JSON line") from None
    if not any("loss" in r for r in records):
        raise ValueError(f"{path}: no record with a 'loss' field")
    return records


def plot(runs: list[Path], out: Path, x: str = "step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        recs = read_metrics(run)
        color = f"C{i}"
        tokens_at = {r["step"]: r.get("tokens", r["step"]) for r in recs if "loss" in r}
        train = [(r["step"] if x == "step" else r.get("tokens", r["step"]), r["loss"])
                 for r in recs if "loss" in r]
        ax.plot(*zip(*train, strict=True), color=color, lw=1.2, label=f"{run.name or run} train")
        val = [(r["step"] if x == "step" else tokens_at.get(r["step"], r["step"]), r["val_loss"])
               for r in recs if "val_loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), color=color, ls="--", marker="o", ms=4, label=f"{run.name} val")
    ax.set_xlabel("step" if x == "step" else "tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path")
    parser.add_argument("--x", choices=("step", "tokens"), default="step")
    args = parser.parse_args(argv)
    out = args.out or ((args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / "loss.png"
                       if len(args.runs) == 1 else Path("loss.png"))
    try:
        plot(args.runs, out, args.x)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
