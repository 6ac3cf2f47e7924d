"""Sample text from a checkpoint, the `python -m tokenformer_dist.generate` command.

    [torchrun --nproc_per_node N] -m tokenformer_dist.generate --ckpt PATH --prompt TEXT ...

The command keeps this path; its code, and its full usage, is tokenformer_dist/inference/generate.py."""

from tokenformer_dist.inference.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
