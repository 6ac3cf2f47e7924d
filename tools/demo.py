"""`make demo`: the whole pipeline on CPU in a few minutes.

sample data (data_prep/build.py, text already on this machine) → train configs/tiny.yaml at TP 2 with
DeepSpeed ZeRO (torchrun, 2 processes) → evaluate the checkpoint and sample from it on ONE process (plain
`python`, TP 1: the TP-2 checkpoint is resharded as it is loaded) → loss-curve PNG →
the progressive-scaling experiment in miniature (--budget small: scratch, no_growth, grow_exact and
grow_official, 2 seeds, compared at equal FLOPs; its last line is the headline, a smoke test at this budget).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tokenformer_dist.cli import ArgumentParser, user_error

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f"demo: step failed (exit {proc.returncode}): {shlex.join(cmd)}")


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--data", default="data/sample", help="dataset directory (built if missing)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip-progressive", action="store_true", help="stop after the loss curve")
    args = parser.parse_args()
    # every step runs in the repository: relative paths are taken from there
    data, out = REPO / args.data, REPO / args.out
    if args.steps <= 0:
        return user_error(f"--steps {args.steps}: must be a positive integer")
    if data.exists() and not data.is_dir():
        return user_error(f"--data {args.data}: is a file; give a dataset directory (built there if missing)")
    if out.exists() and not out.is_dir():
        return user_error(f"--out {args.out}: is a file; give a run directory")
    py = sys.executable
    t0 = time.time()
    if not (data / "manifest.json").exists():
        run([py, "data_prep/build.py", "--output", args.data])
    else:
        print(f"demo: using the dataset already built in {args.data}")
    run([py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "tokenformer_dist.train", "--config", "configs/tiny.yaml", "--data", args.data,
         "--run-dir", args.out, "--steps", str(args.steps), "--tp", "2"])
    run([py, "-m", "tokenformer_dist.evaluate", "--ckpt", args.out, "--data", args.data, "--json"])
    run([py, "-m", "tokenformer_dist.generate", "--ckpt", args.out, "--prompt", "The river", "--max-new-tokens", "24"])
    run([py, "tools/plot_metrics.py", args.out, "--out", f"{args.out}/loss_curve.png"])
    if not args.skip_progressive and (REPO / "tools" / "progressive_experiment.py").exists():
        run([py, "tools/progressive_experiment.py", "--data", args.data, "--out", f"{args.out}/progressive",
             "--budget", "small"])
    done = f"\ndemo: done in {time.time() - t0:.0f} s; loss curve in {args.out}/loss_curve.png"
    if not args.skip_progressive:
        done += f"; progressive experiment in {args.out}/progressive/results.md"
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
