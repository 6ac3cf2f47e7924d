"""Grow and reshard a checkpoint, the `python -m tokenformer_dist.expand_cli` command.

    python -m tokenformer_dist.expand_cli --ckpt RUN --out DIR --tp N ...

The command keeps this path; its code, and its full usage, is tokenformer_dist/growth/cli.py."""

from tokenformer_dist.growth.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
