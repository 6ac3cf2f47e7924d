"""Pretraining: megatron-core tensor parallelism inside a DeepSpeed ZeRO engine (data parallel).

    torchrun --nproc_per_node N -m tokenformer_dist.train --config CONFIG.yaml [--data DIR] [--run-dir DIR]
        [--steps N] [--tp N] [--zero-stage 1|2|3] [--init-from CKPT] [--set key=value ...]

Also runs under the `deepspeed` launcher and `srun`. DP size = world / TP. A run directory that holds a
checkpoint is resumed (at another DP size through a DeepSpeed universal checkpoint). SIGTERM / SIGUSR1
(Slurm preemption) make every rank save a checkpoint at the next step boundary and exit with
EXIT_PREEMPTED (75, EX_TEMPFAIL) so the job can be requeued. Exit 2: bad arguments or config.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import resource
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from tokenformer_dist import checkpoint as ckpt_lib
from tokenformer_dist.config import Config, ConfigError, add_config_args, load_config
from tokenformer_dist.metrics import MetricsWriter, flops_per_token, peak_flops
from tokenformer_dist.schedule import lr_at

EXIT_PREEMPTED = 75


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train TokenFormer (TP x ZeRO-DP).")
    add_config_args(parser)
    parser.add_argument("--data", default=None, help="built dataset dir (overrides data.path)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    parser.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3),
                        help="ZeRO stage (overrides parallel.zero_stage)")
    parser.add_argument("--init-from", default=None,
                        help="model weights only (fresh optimizer and schedule) from a checkpoint, "
                             "run dir or weights dir written at the same TP")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.zero_stage is not None:
        overrides.append(f"parallel.zero_stage={args.zero_stage}")
    return load_config(args.config, overrides, args.tp)


def deepspeed_config(cfg: Config, dp: int, bf16: bool, universal: bool) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "checkpoint": {"load_universal": universal},
    }


def build_optimizer(model: torch.nn.Module, cfg: Config, fused: bool) -> torch.optim.Optimizer:
    """torch AdamW (fused on GPU; DeepSpeed's FusedAdam JIT-compiles on CPU). No decay on LayerNorm γ/β."""
    t = cfg.train
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=fused or None)


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (CPU training).

    Why: a training step allocates and frees the same large tensors every time (logits, activations,
    ZeRO's flat gradient and master-weight copies). By default glibc serves blocks above its mmap threshold
    (at most 32 MiB) with fresh mmaps and trims the heap top on free, so every step page-faults in hundreds
    of MB again: measured ~13k faults and ~40% of DeepSpeed's optimizer step, ~10% of forward+backward, in
    kernel time (see docs/training.md, "Throughput (P5)"). Heap only (no mmap) and no trimming make the
    steady state fault-free, for ~15% more peak RSS (freed blocks stay in the process). Process-wide; a
    no-op off glibc.
    Returns whether the settings were applied.
    """
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def train_step(engine: Any, batches: Iterator[torch.Tensor], lr: float, grad_accum: int,
               device: torch.device) -> torch.Tensor:
    """One optimizer step of `grad_accum` micro-batches (each [b, s+1] tokens) at learning rate `lr`.
    Returns the sum of the micro-batch losses as a detached fp32 CPU scalar (no device sync)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float32)
    for _ in range(grad_accum):
        batch = next(batches).to(device)
        loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float().cpu()
    return loss_sum


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it at step boundaries (one all-reduce of a scalar)."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.flag = True

    def any_rank(self) -> bool:
        t = torch.tensor([1.0 if self.flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS of this rank (KiB on Linux)


def _say(bar: tqdm, line: str) -> None:
    if bar.disable:
        print(line, flush=True)
    else:
        bar.write(line)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def train(args: argparse.Namespace, cfg: Config, destroy: bool = True) -> int:
    """One training run. destroy=False keeps torch.distributed up (several runs in one launch, for tests)."""
    import deepspeed

    from tokenformer_dist.data import TokenShards, WindowLoader
    from tokenformer_dist.evaluate import evaluate
    from tokenformer_dist.model.tensor_parallel import build_parallel_model
    from tokenformer_dist.parallel import DeepSpeedMPU, destroy_distributed, init_distributed
    from tokenformer_dist.weights import load_weights

    info = init_distributed(cfg.parallel.tp)
    if info.device.type == "cpu":
        tune_cpu_allocator()
    run_dir = Path(args.run_dir or Path("runs") / Path(cfg.source).stem)
    t, m = cfg.train, cfg.model
    on_gpu = info.device.type == "cuda"
    bf16 = cfg.parallel.dtype == "bf16" or (cfg.parallel.dtype == "auto" and on_gpu)

    # What to resume from; decided before the engine exists (universal loading is an engine option).
    tag = ckpt_lib.latest_tag(run_dir)
    resume_dir = ckpt_lib.checkpoints_dir(run_dir) / tag if tag else None
    meta = ckpt_lib.read_meta(resume_dir) if resume_dir else None
    if meta and meta["tp"] != info.tp_size:
        raise ConfigError(f"{resume_dir}: checkpoint is at tp={meta['tp']}, this run uses tp={info.tp_size}; "
                          f"resume at --tp {meta['tp']}")
    universal = bool(meta) and meta["dp"] != info.dp_size

    torch.manual_seed(t.seed)
    model = build_parallel_model(m, parallel_state.get_tensor_model_parallel_group(), seed=t.seed,
                                 activation_checkpointing=cfg.parallel.activation_checkpointing, device=info.device)
    model.to(info.device)
    if args.init_from and not meta:
        load_weights(model, ckpt_lib.resolve_checkpoint(args.init_from))
    optimizer = build_optimizer(model, cfg, fused=on_gpu)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=DeepSpeedMPU,
                                      config=deepspeed_config(cfg, info.dp_size, bf16, universal))
    loader = WindowLoader(cfg.data.path, "train", m.seq_len, t.micro_batch_size, info.dp_rank, info.dp_size,
                          seed=cfg.data.seed)
    step, tokens_seen = 0, 0
    if meta:
        if universal:
            universal_dir = ckpt_lib.ensure_universal(resume_dir, info)
            engine.load_checkpoint(str(universal_dir.parent), tag=universal_dir.name,
                                   load_lr_scheduler_states=False)
        else:
            engine.load_checkpoint(str(resume_dir.parent), tag=resume_dir.name,
                                   load_lr_scheduler_states=False)
        ckpt_lib.restore_buffers(engine.module, resume_dir, info.tp_rank)
        if meta["world_size"] == info.world_size:
            ckpt_lib.load_rng(resume_dir, info.rank)
        loader.load_state_dict(meta["loader"])
        step, tokens_seen = meta["step"], meta["tokens"]
        if info.is_main:
            print(f"resumed from {resume_dir} at step {step} (saved at dp={meta['dp']}, now dp={info.dp_size}"
                  f"{', via universal checkpoint' if universal else ''})", flush=True)

    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * info.dp_size * m.seq_len
    flops_tok = flops_per_token(m)
    peak = peak_flops(info.device)
    writer = MetricsWriter(run_dir, resume_step=step) if info.is_main else None
    preempt = Preemption()
    dp_group = parallel_state.get_data_parallel_group()
    try:  # periodic validation needs a val split
        has_val = TokenShards(cfg.data.path, "val").n_windows(m.seq_len) > 0
    except (OSError, ValueError, KeyError):
        has_val = False

    def save() -> None:
        ckpt_lib.save_checkpoint(engine, run_dir, step, cfg, info,
                                 {"tokens": tokens_seen, "loader": loader.state_dict(),
                                  "dtype": "bf16" if bf16 else "fp32"}, t.keep_last)

    it = iter(loader)
    start_step, t_start = step, time.perf_counter()
    t_last, step_last = t_start, step
    bar = tqdm(total=t.steps, initial=step, desc="train", disable=not (info.is_main and sys.stderr.isatty()),
               dynamic_ncols=True)
    exit_code = 0
    while step < t.steps:
        lr = lr_at(step, t.steps, t.lr, t.min_lr, t.warmup_frac)
        loss_sum = train_step(engine, it, lr, t.grad_accum_steps, info.device)
        step += 1
        tokens_seen += tokens_per_step
        bar.update(1)

        if step % t.log_every == 0 or step == t.steps:
            dist.all_reduce(loss_sum, group=dp_group)
            now = time.perf_counter()
            tok_s = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            gnorm = engine.get_global_grad_norm()
            record: dict[str, Any] = {
                "step": step, "loss": loss_sum.item() / (t.grad_accum_steps * info.dp_size), "lr": lr,
                "grad_norm": float(gnorm) if gnorm is not None else None, "tokens_per_s": tok_s,
                "tokens": tokens_seen, "flops_per_s": tok_s * flops_tok,
                "mem_gb": _memory_gb(info.device),
            }
            if peak:
                record["mfu"] = tok_s * flops_tok / (peak * info.world_size)
            eta = (t.steps - step) * (now - t_start) / max(step - start_step, 1)
            if writer:
                writer.log(record)
                perf = f"mfu {record['mfu']:.1%}" if peak else f"{record['flops_per_s'] / 1e9:.2f} GFLOP/s"
                _say(bar, f"step {step:>7d}  loss {record['loss']:.4f}  lr {lr:.3e}  gnorm "
                          f"{record['grad_norm'] or 0:.3f}  {tok_s:,.0f} tok/s  {perf}  mem "
                          f"{record['mem_gb']:.2f} GB  eta {_fmt_eta(eta)}")
        if has_val and (step % t.eval_every == 0 or step == t.steps):
            val = evaluate(engine.module, cfg.data.path, m.seq_len, t.micro_batch_size, t.eval_batches)
            if writer:
                writer.log({"step": step, "val_loss": val["loss"], "val_ppl": val["ppl"]})
                _say(bar, f"step {step:>7d}  val loss {val['loss']:.4f}  ppl {val['ppl']:.2f}")
        if preempt.any_rank():
            save()
            if info.is_main:
                _say(bar, f"preempted: checkpoint saved at step {step}; exiting {EXIT_PREEMPTED} for requeue")
            exit_code = EXIT_PREEMPTED
            break
        if step % t.save_every == 0 and step < t.steps:
            save()
    if exit_code == 0:
        save()
    bar.close()
    if writer:
        writer.close()
    if destroy:
        destroy_distributed()
    else:
        parallel_state.destroy_model_parallel()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.init_from:
            ckpt_lib.resolve_checkpoint(args.init_from)  # fail fast, before start-up
        if not Path(cfg.data.path).is_dir():
            raise ConfigError(f"data.path / --data {cfg.data.path!r}: no such dataset directory "
                              f"(build one with data_prep/build.py)")
        return train(args, cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
