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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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
    args = parser.parse_args()

    from tokenformer_dist.config import load_config
    from tokenformer_dist.expand import expand_checkpoint
    from tokenformer_dist.model import TokenFormer
    from tokenformer_dist.parallel import destroy_distributed, init_distributed
    from tokenformer_dist.weights import write_sharded_weights

    work = Path(tempfile.mkdtemp(prefix="bench_expand_", dir=args.workdir))
    try:
        cfg = load_config(args.config, tp=2)
        init_distributed(1)
        model = TokenFormer(cfg.model, seed=0)
        src = work / "src"
        write_sharded_weights(src, cfg, model.state_dict().items(), tp=2)
        del model
        destroy_distributed()
        size = du(src)
        print(f"source: {args.config} at TP 2, {size / 1e6:.0f} MB")
        py = sys.executable
        t_cp = timed(["cp", "-r", str(src), str(work / "copy")])
        t_grow = timed([py, "tools/expand_tokens.py", "--ckpt", str(src), "--out", str(work / "grown"),
                        "--tp", str(args.tp), "--config", args.target, "--no-progress"])
        t_reshard = timed([py, "tools/expand_tokens.py", "--ckpt", str(src), "--out", str(work / "reshard"),
                           "--tp", str(args.tp), "--grow", "1", "--no-progress"])
        t_import = timed([py, "-c", "import tokenformer_dist.expand"])
        t0 = time.perf_counter()
        expand_checkpoint(src, work / "grown2", args.tp, load_config(args.target, tp=args.tp), progress=False)
        subprocess.run(["sync"], check=True)
        t_inproc = time.perf_counter() - t0
        out_size = du(work / "grown")
        print(f"cp -r                              {t_cp:7.2f} s   ({size / 1e6:.0f} MB)")
        print(f"expand {Path(args.config).stem}→{Path(args.target).stem} TP2→TP{args.tp} (CLI)"
              f"  {t_grow:7.2f} s   ({out_size / 1e6:.0f} MB written)  ratio {t_grow / t_cp:.2f}x")
        print(f"reshard TP2→TP{args.tp} (CLI)              {t_reshard:7.2f} s   ratio {t_reshard / t_cp:.2f}x")
        print(f"expand, in-process call only        {t_inproc:7.2f} s   ratio {t_inproc / t_cp:.2f}x")
        print(f"python start-up + imports           {t_import:7.2f} s   (included in the CLI rows)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
