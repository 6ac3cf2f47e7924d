"""Grow a checkpoint's parameter tokens and reshard it for the next stage's tensor-parallel degree.

    python tools/expand_tokens.py --ckpt runs/124m --out ckpt/354m_init --tp 8 --config configs/owt_354m.yaml
    python tools/expand_tokens.py --ckpt runs/124m --out ckpt/x --tp 8 --tokens qkv=2144,proj=2144,ffn=8560
    python tools/expand_tokens.py --ckpt runs/124m --out ckpt/reshard --tp 2 --grow 1      # pure reshard

(also `python -m tokenformer_dist.expand_cli ...`). The output is a weights directory that
`tokenformer_dist.train --init-from` and `tokenformer_dist.evaluate` load at TP N. With the default
`--init exact` the grown model computes exactly the old function. Flags map onto `expand_checkpoint`'s
arguments of the same name (--init → init, --seed → seed, --keep-optimizer → keep_optimizer).
"""

from __future__ import annotations

import json
import sys

from tokenformer_dist.checkpoint.engine import read_config, resolve_checkpoint
from tokenformer_dist.cli import ArgumentParser
from tokenformer_dist.config import ConfigError, load_config
from tokenformer_dist.growth.expand import expand_checkpoint
from tokenformer_dist.growth.tokens import INIT_MODES, KINDS, grown_counts, token_counts, with_counts


def parse_tokens(spec: str) -> dict[str, int]:
    """`--tokens qkv=N,proj=N,ffn=N` → counts (every kind required)."""
    counts: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in KINDS or not value.strip().isdigit():
            raise ConfigError(f"--tokens {spec!r}: expected qkv=N,proj=N,ffn=N with positive integers")
        counts[key] = int(value)
    if set(counts) != set(KINDS):
        raise ConfigError(f"--tokens {spec!r}: give all of qkv=N,proj=N,ffn=N")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="run directory, trainer checkpoint, or an earlier output")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel degree to write for")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", help="target config YAML (its token counts)")
    target.add_argument("--tokens", help="target counts: qkv=N,proj=N,ffn=N")
    target.add_argument("--grow", type=float, help="multiply every count by F (rounded up to a multiple of --tp)")
    parser.add_argument("--init", choices=INIT_MODES, default="exact",
                        help="exact: function-preserving (default); official: as the official code")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new value (and official key) rows")
    parser.add_argument("--keep-optimizer", action="store_true",
                        help="also carry the Adam moments (zeros for new rows) and the step count, "
                             "as a resumable universal checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.tp <= 0:
            raise ConfigError(f"--tp {args.tp}: must be a positive integer")
        src = resolve_checkpoint(args.ckpt)
        src_cfg = read_config(src)
        if args.config:
            dst_cfg = load_config(args.config, tp=args.tp)
        elif args.tokens:
            dst_cfg = with_counts(src_cfg, parse_tokens(args.tokens), args.tp, f"--tokens {args.tokens}")
        else:
            try:
                counts = grown_counts(token_counts(src_cfg), args.grow, args.tp)
            except ConfigError as e:
                raise ConfigError(f"--grow {args.grow:g}: {e}") from None
            dst_cfg = with_counts(src_cfg, counts, args.tp, f"--grow {args.grow:g}")
        manifest = expand_checkpoint(src, args.out, args.tp, dst_cfg, args.init, args.seed,
                                     progress=not args.no_progress, keep_optimizer=args.keep_optimizer)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    old, new = manifest["old_tokens"], manifest["new_tokens"]
    print(f"wrote {args.out} (tp {args.tp}): tokens qkv {old['qkv']}→{new['qkv']}, proj {old['proj']}→"
          f"{new['proj']}, ffn {old['ffn']}→{new['ffn']}, init {args.init}")
    if args.keep_optimizer:
        print(f"optimizer state kept: resume with `-m tokenformer_dist.train --config {args.out}/config.yaml "
              f"--run-dir {args.out}`")
    if not manifest["function_preserving"]:
        print("note: --init official changes the model's function (τ = √n_new and random new key rows); "
              "expect a higher loss at the first step", file=sys.stderr)
    print(json.dumps(manifest))
    return 0
