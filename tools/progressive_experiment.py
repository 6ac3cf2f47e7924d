"""The progressive-scaling experiment in miniature: does growing a trained TokenFormer beat not growing, at
equal compute? Thin command line over tokenformer_dist.progressive (see docs/progressive_scaling.md).

    python tools/progressive_experiment.py [--data DIR] [--out DIR] [--budget full|small|test]
        [--config configs/progressive_mini.yaml] [--overwrite]
"""

import sys

from tokenformer_dist.progressive.cli import main

if __name__ == "__main__":
    sys.exit(main())
