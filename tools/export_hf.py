"""Export a checkpoint (any TP degree, any ZeRO stage) as a Hugging Face folder.

    python tools/export_hf.py --ckpt runs/124m --out hf/tokenformer-124m
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/tokenformer-124m', \
        trust_remote_code=True)"

What the folder holds: tokenformer_dist/inference/hf/export.py. Needs the [hf] extra (transformers).
"""

import sys

from tokenformer_dist.inference.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
