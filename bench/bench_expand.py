"""P6: expanding + resharding a checkpoint against `cp -r` of the same checkpoint, in one run.

    python bench/bench_expand.py [--config configs/owt_354m.yaml] [--target configs/owt_757m.yaml] [--tp 8]

Builds a source weights directory for --config (TP 2, the real model's state dict, fp32), then times, each
followed by `sync` so that both sides pay for reaching the disk:
  cp -r SRC                                    the baseline
  tools/expand_tokens.py --config TARGET --tp 8  one ladder step (grows every count, writes TP 8)
  tools/expand_tokens.py --grow 1 --tp 8         a pure reshard
(whole commands, Python start-up and imports included), and the in-process expand_checkpoint() call alone.
Goal: expand+reshard ≤ 3× cp -r.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/owt_354m.yaml")
    parser.add_argument("--target", default="configs/owt_757m.yaml")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from tokenformer_dist.checkpoint.weights import write_sharded_weights
    from tokenformer_dist.config import load_config
    from tokenformer_dist.growth.expand import expand_checkpoint
    from tokenformer_dist.model import TokenFormer

    work = Path(tempfile.mkdtemp(prefix="bench_expand_", dir=args.workdir))
    try:
        cfg = load_config(args.config, tp=2)
        model = TokenFormer(cfg.model, seed=0)
        src = work / "src"
        write_sharded_weights(src, cfg, model.state_dict().items(), tp=2)
        del model
        subprocess.run(["sync"], check=True)  # the source's own writeback must not land in a timed step
        size = du(src)
        print(f"source: {args.config} at TP 2, {size / 1e6:.0f} MB; {args.rounds} rounds, medians")
        py = sys.executable
        target = load_config(args.target, tp=args.tp)

        def in_process(out: Path) -> float:
            t0 = time.perf_counter()
            expand_checkpoint(src, out, args.tp, target, progress=False)
            subprocess.run(["sync"], check=True)
            return time.perf_counter() - t0

        steps = {
            "cp -r": lambda out: timed(["cp", "-r", str(src), str(out)]),
            "expand (CLI)": lambda out: timed([py, "tools/expand_tokens.py", "--ckpt", str(src), "--out", str(out),
                                               "--tp", str(args.tp), "--config", args.target, "--no-progress"]),
            "reshard (CLI)": lambda out: timed([py, "tools/expand_tokens.py", "--ckpt", str(src), "--out", str(out),
                                                "--tp", str(args.tp), "--grow", "1", "--no-progress"]),
            "expand (in-process)": in_process,
        }
        times: dict[str, list[float]] = {k: [] for k in steps}
        out_size = 0
        for _ in range(args.rounds):  # interleaved, so that load drifts hit every side alike
            for label, step in steps.items():
                out = work / "out"
                times[label].append(step(out))
                if label == "expand (CLI)":
                    out_size = du(out)
                shutil.rmtree(out)
                subprocess.run(["sync"], check=True)
        t_import = statistics.median(timed([py, "-c", "import tokenformer_dist.growth.expand"]) for _ in range(3))
        med = {k: statistics.median(v) for k, v in times.items()}
        grow_desc = f"{Path(args.config).stem}→{Path(args.target).stem}, TP2→TP{args.tp}"
        print(f"cp -r                   {med['cp -r']:7.2f} s   ({size / 1e6:.0f} MB)")
        print(f"expand (CLI)            {med['expand (CLI)']:7.2f} s   ratio {med['expand (CLI)'] / med['cp -r']:.2f}x"
              f"   ({grow_desc}, {out_size / 1e6:.0f} MB written)")
        ratio = med["reshard (CLI)"] / med["cp -r"]
        print(f"reshard (CLI)           {med['reshard (CLI)']:7.2f} s   ratio {ratio:.2f}x"
              f"   (--grow 1, TP2→TP{args.tp})")
        print(f"expand (in-process)     {med['expand (in-process)']:7.2f} s   ratio "
              f"{med['expand (in-process)'] / med['cp -r']:.2f}x")
        print(f"python start-up+imports {t_import:7.2f} s   (inside the CLI rows)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
