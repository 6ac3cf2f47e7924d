"""Pretraining, the `python -m tokenformer_dist.train` command.

    torchrun --nproc_per_node N -m tokenformer_dist.train --config CONFIG.yaml ...

The command keeps this path; its code, and its full usage, is tokenformer_dist/training/cli.py."""

from tokenformer_dist.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
