"""Plan a training layout: per-GPU memory, step time, tokens/s and MFU of every layout of a config on a cluster.

    python tools/plan.py --config configs/owt_1p4b.yaml --nodes 8 --gpus-per-node 8 --gpu h100
        [--tp T] [--micro-batch B] [--zero-stage Z] [--activation-checkpointing on|off]

Prints one row per layout (fastest first; those that cannot fit with a one-line reason), marks the fastest
that fits, and ends with that layout as one JSON line. Exit 2: bad flags or config; 1: nothing fits.
The model behind every column: tokenformer_dist/planning/plan.py and docs/performance.md.
"""

import sys

from tokenformer_dist.planning.plan import main

if __name__ == "__main__":
    sys.exit(main())
