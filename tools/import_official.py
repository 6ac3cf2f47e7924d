"""Convert an official TokenFormer checkpoint (Haiyang-W/TokenFormer, GPT-NeoX layout) into a weights dir.

    python tools/import_official.py --ckpt TokenFormer-150M --config 150M_eval.yml --out ckpt/tf150m --tp 1
    python tools/import_official.py --ckpt 354M_TokenFormer_Openwebtext2/checkpoints --out ckpt/tf354m --tp 8

The layout, the names and the conventions are documented in tokenformer_dist/checkpoint/official.py.
"""

import sys

from tokenformer_dist.checkpoint.official import main

if __name__ == "__main__":
    sys.exit(main())
