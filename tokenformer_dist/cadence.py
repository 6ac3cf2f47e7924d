"""Checkpoint cadence and time-limit lead, the `python -m tokenformer_dist.cadence` command.

    python -m tokenformer_dist.cadence --config CONFIG --nodes N --gpus-per-node G ...

The command keeps this path; its code, and its full usage, is tokenformer_dist/planning/cadence.py."""

from tokenformer_dist.planning.cadence import main

if __name__ == "__main__":
    raise SystemExit(main())
