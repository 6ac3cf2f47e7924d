"""Grow a checkpoint's parameter tokens and reshard it for another TP degree: see tokenformer_dist/growth/cli.py.

    python tools/expand_tokens.py --ckpt runs/124m --out ckpt/354m_init --tp 8 --config configs/owt_354m.yaml
"""

import sys

from tokenformer_dist.growth.cli import main

if __name__ == "__main__":
    sys.exit(main())
