"""Host-device synchronizations inside training steps (GPU only; run by tests/test_gpu.py under torchrun).

usage: sync_check.py TRAINER-ARGV...   (what `python -m tokenformer_dist.train` takes)

Builds the engine, the loader and the step exactly as the trainer does (trainer.build_engine, Prefetcher,
trainer.train_step), runs WARMUP steps (compilation, allocator growth), then STEPS more steps under
`torch.cuda.set_sync_debug_mode("warn")`, which makes every synchronizing CUDA call warn. No logging,
validation, preemption or checkpoint step falls inside: those sync on purpose. Prints one JSON line:
{"syncs": [[stack, ...], ...], "allowed": N} — `allowed` counts the one sync documented as unavoidable
(DeepSpeed's `is_invalid_grad_norm`, a bool() of the gradient norm in every optimizer step), `syncs` the
stacks (innermost project/DeepSpeed/torch frames) of every other one.
"""

import json
import sys
import traceback
import warnings

import torch

from tokenformer_dist.data import Prefetcher, WindowLoader
from tokenformer_dist.distributed.launch import destroy_distributed, init_distributed
from tokenformer_dist.training import trainer
from tokenformer_dist.training.cli import parse_args, resolve_config

WARMUP, STEPS = 3, 5
ALLOWED = ("deepspeed/runtime/utils.py", "is_invalid_grad_norm")


def main() -> None:
    args = parse_args(sys.argv[1:])
    cfg = resolve_config(args)
    t, m = cfg.train, cfg.model
    info = init_distributed(cfg.parallel.tp, seed=t.seed)
    bf16 = cfg.parallel.dtype == "bf16" or (cfg.parallel.dtype == "auto" and info.device.type == "cuda")
    engine = trainer.build_engine(cfg, info, bf16, trainer.Resume(None, None, False), None)
    loader = WindowLoader(cfg.data.path, "train", m.seq_len, t.micro_batch_size, info.dp_rank, info.dp_size,
                          seed=cfg.data.seed)
    batches = Prefetcher(loader, info.device, cfg.data.prefetch_batches)
    for _ in range(WARMUP):
        trainer.train_step(engine, batches, t.lr, t.grad_accum_steps)
    torch.cuda.synchronize()

    stacks: list[list[str]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = traceback.extract_stack()[:-1]
            stacks.append([f"{f.filename}:{f.lineno} {f.name}" for f in frames])

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    for _ in range(STEPS):
        trainer.train_step(engine, batches, t.lr, t.grad_accum_steps)
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    batches.close()
    allowed = [s for s in stacks if any(ALLOWED[0] in f and ALLOWED[1] in f for f in s)]
    other = [s[-8:] for s in stacks if s not in allowed]
    print(json.dumps({"syncs": other, "allowed": len(allowed)}), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
