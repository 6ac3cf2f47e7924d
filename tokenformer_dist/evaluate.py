"""Validation loss of a checkpoint, the `python -m tokenformer_dist.evaluate` command.

    [torchrun --nproc_per_node N] -m tokenformer_dist.evaluate --ckpt PATH --data DIR ...

The command keeps this path; its code, and its full usage, is tokenformer_dist/inference/evaluate.py."""

from tokenformer_dist.inference.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
