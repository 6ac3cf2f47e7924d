"""Pretraining: megatron-core tensor parallelism inside a DeepSpeed ZeRO engine (data parallel).

    torchrun --nproc_per_node N -m tokenformer_dist.train --config CONFIG.yaml [--data DIR] [--run-dir DIR]
        [--steps N] [--tp N] [--zero-stage 1|2|3] [--init-from CKPT] [--profile N] [--set key=value ...]

Also runs under the `deepspeed` launcher and `srun`. DP size = world / TP. A run directory that holds a
checkpoint is resumed (at another DP size through a DeepSpeed universal checkpoint). SIGTERM / SIGUSR1
(Slurm preemption) make every rank save a checkpoint within `train.preempt_check_every` steps and exit with
EXIT_PREEMPTED (75, EX_TEMPFAIL) so the job can be requeued. Exit 2: bad arguments, config or environment.

This module is the command line (tokenformer_dist/train.py keeps the `-m` path); the pieces: trainer.py (the
loop), optim.py (optimizer), allocator.py (CPU allocator tuning), preemption.py (signals), and from
distributed/: deepspeed_config.py (DeepSpeed config) and launch.py (process groups).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenformer_dist.checkpoint import engine as ckpt_lib
from tokenformer_dist.cli import ArgumentParser, positive_int
from tokenformer_dist.config import Config, ConfigError, add_config_args, load_config
from tokenformer_dist.model.compile import CompileError, compile_errors
from tokenformer_dist.training.preemption import EXIT_PREEMPTED
from tokenformer_dist.training.trainer import train

__all__ = ["EXIT_PREEMPTED", "main", "parse_args", "resolve_config", "train"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Train TokenFormer (TP x ZeRO-DP).")
    add_config_args(parser)
    parser.add_argument("--data", default=None, help="built dataset dir (overrides data.path)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    parser.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3),
                        help="ZeRO stage (overrides parallel.zero_stage)")
    parser.add_argument("--profile", type=positive_int, default=None, metavar="N",
                        help="profile N steps after a short warm-up: a torch.profiler trace under "
                             "<run-dir>/profile/ and the top kernels (ops on CPU) printed")
    parser.add_argument("--init-from", default=None,
                        help="model weights only (fresh optimizer and schedule) from a checkpoint, "
                             "run dir or weights dir written at any TP (resharded as it loads)")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.zero_stage is not None:
        overrides.append(f"parallel.zero_stage={args.zero_stage}")
    return load_config(args.config, overrides, args.tp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.init_from:
            ckpt_lib.resolve_checkpoint(args.init_from)  # fail fast, before start-up
        if not Path(cfg.data.path).is_dir():
            raise ConfigError(f"data.path / --data {cfg.data.path!r}: no such dataset directory "
                              f"(build one with data_prep/build.py)")
        # a torch.compile failure (the first step, or a recompile at validation) is one line naming train.compile
        with compile_errors(f"train.compile={cfg.train.compile}"):
            return train(args, cfg)
    except (ConfigError, ValueError, CompileError) as e:  # DatasetError, launch.LaunchError: ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
