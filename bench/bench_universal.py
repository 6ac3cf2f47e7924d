"""Time DeepSpeed's universal-checkpoint conversion (what a resume at another DP size runs on rank 0 while
every other rank waits) per GB of checkpoint, on this machine's CPU.

    python bench/bench_universal.py [--config configs/owt_354m.yaml] [--nproc 2] [--workers 1] [--keep DIR]

Trains the config for one step (real trainer under torchrun, fp32 on CPU, ZeRO from the config, sequence
length cut to 32 and micro-batch 1: the checkpoint has the full model and optimizer state) on a synthetic
dataset, then runs `checkpoint.engine.convert_to_universal` on the checkpoint (ds_to_universal with --workers
extract and merge workers) and prints the DeepSpeed checkpoint's size, the universal checkpoint's size, the
time and the seconds per GB of input. Needs ~12 GB of memory and ~3x the checkpoint size of disk at 354M.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/owt_354m.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="trainer ranks (the checkpoint's DP size)")
    parser.add_argument("--workers", type=int, default=1, help="ds_to_universal extract and merge workers")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir)")
    args = parser.parse_args()

    from tokenformer_dist.checkpoint import engine as ckpt_lib
    from tokenformer_dist.config import load_config, param_count
    from tokenformer_dist.data import write_synthetic_dataset
    from tokenformer_dist.distributed.net import free_port

    cfg = load_config(REPO / args.config)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-universal-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = work / "data"
        if not (data / "manifest.json").is_file():
            write_synthetic_dataset(data, cfg.model.vocab_size, train_tokens=20_000, val_tokens=2_000)
        run = work / "run"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(free_port()), "-m", "tokenformer_dist.train", "--config", str(REPO / args.config),
               "--data", str(data), "--run-dir", str(run), "--steps", "1", "--set", "model.seq_len=32",
               "--set", "train.micro_batch_size=1", "--set", "train.grad_accum_steps=1", "--set",
               "train.eval_every=1000000", "--set", "parallel.dtype=fp32"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if proc.returncode != 0:
            print(f"error: training the checkpoint failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        train_s = time.perf_counter() - t0
        ckpt = ckpt_lib.resolve_checkpoint(run)
        out = ckpt / ckpt_lib.UNIVERSAL
        shutil.rmtree(out, ignore_errors=True)  # from an earlier run with --keep
        ds_bytes = dir_bytes(ckpt, "*.pt")  # DeepSpeed's model and optimizer states: what ds_to_universal reads
        t0 = time.perf_counter()
        ckpt_lib.convert_to_universal(ckpt, out, workers=args.workers)
        convert_s = time.perf_counter() - t0
        uni_bytes = dir_bytes(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    gb = ds_bytes / 1e9
    print(f"{args.config}: {param_count(cfg.model) / 1e6:.1f}M parameters, fp32, ZeRO {cfg.parallel.zero_stage}, "
          f"DP {args.nproc} (trained 1 step in {train_s:.0f} s)")
    print(f"DeepSpeed checkpoint {gb:.2f} GB -> universal {uni_bytes / 1e9:.2f} GB in {convert_s:.1f} s with "
          f"{args.workers} extract/merge worker(s): {convert_s / gb:.1f} s per GB of checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
