"""The training loop: set-up (engine, resume), the step, logging, validation, checkpoints, preemption.

`train(args, cfg)` is what `python -m tokenformer_dist.train` runs (training/cli.py is its command line).
Host syncs: none inside a step; the logged loss is read on logging steps, the preemption flag every
`train.preempt_check_every` steps, validation and checkpoints at their own intervals.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from tokenformer_dist.checkpoint import engine as ckpt_lib
from tokenformer_dist.config import Config, ConfigError, compile_on
from tokenformer_dist.distributed import comm
from tokenformer_dist.distributed.deepspeed_config import deepspeed_config
from tokenformer_dist.distributed.launch import DistInfo, ranks_per_node
from tokenformer_dist.model.flops import flops_per_token
from tokenformer_dist.planning.cadence import startup_line
from tokenformer_dist.training.allocator import tune_cpu_allocator
from tokenformer_dist.training.metrics import MetricsWriter, peak_flops
from tokenformer_dist.training.optim import build_optimizer
from tokenformer_dist.training.preemption import EXIT_PREEMPTED, Preemption
from tokenformer_dist.training.schedule import lr_at


def train_step(engine: Any, batches: Iterator[torch.Tensor], lr: float, grad_accum: int) -> torch.Tensor:
    """One optimizer step of `grad_accum` micro-batches (each [b, s+1] tokens, already on the device) at
    learning rate `lr`. Returns the sum of the micro-batch losses, detached, fp32, ON THE DEVICE: reading it
    is a host sync, left to the caller's logging steps."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = None
    for _ in range(grad_accum):
        batch = next(batches)
        loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        engine.step()
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
    return loss_sum


@dataclass
class Resume:
    """What the run directory says about where to start (decided before the engine exists)."""

    ckpt_dir: Path | None
    meta: dict[str, Any] | None
    universal: bool


def find_resume(run_dir: Path, info: DistInfo) -> Resume:
    """Collective. Rank 0 reads `latest` and its meta.json, every rank takes that answer and checks it sees the
    same checkpoint (a node with a stale `latest` would otherwise resume another step)."""
    tag, meta = comm.decide_on_rank0(lambda: ckpt_lib.latest_checkpoint(run_dir))
    ckpt_dir = ckpt_lib.checkpoints_dir(run_dir) / tag if tag else None
    if ckpt_dir and meta:
        ckpt_lib.require_checkpoint_visible(ckpt_dir, meta)
    if meta and meta["tp"] != info.tp_size:
        raise ConfigError(f"{ckpt_dir}: checkpoint is at tp={meta['tp']}, this run uses tp={info.tp_size}; "
                          f"resume at --tp {meta['tp']}")
    return Resume(ckpt_dir, meta, bool(meta) and meta["dp"] != info.dp_size)


def build_engine(cfg: Config, info: DistInfo, bf16: bool, resume: Resume, init_from: str | None) -> Any:
    """TokenFormer inside a DeepSpeed engine. The random master init is drawn only for a fresh run: with
    a checkpoint or --init-from, every weight is overwritten anyway."""
    import deepspeed

    from tokenformer_dist.distributed.launch import DeepSpeedMPU
    from tokenformer_dist.model.tensor_parallel import build_parallel_model

    on_gpu = info.device.type == "cuda"
    fresh = resume.meta is None and not init_from
    # built on the meta device: only this rank's shards are ever allocated
    model = build_parallel_model(cfg.model, parallel_state.get_tensor_model_parallel_group(), seed=cfg.train.seed,
                                 activation_checkpointing=cfg.parallel.activation_checkpointing, init_weights=fresh,
                                 device=info.device)
    if init_from and not resume.meta:
        ckpt_lib.load_weights_resharded(model, init_from)  # written at any TP degree: resharded as it loads
    if resume.universal:
        ckpt_lib.mark_universal_restore(model, parallel_state.get_tensor_model_parallel_group(), info.tp_size)
    compiled = compile_on(cfg, info.device.type)
    if compiled:
        from tokenformer_dist.model.compile import compile_model, keep_hooks_eager

        compile_model(model, cfg.train.compile_mode, cfg.train.compile_backend)  # lazily: the first step compiles
    optimizer = build_optimizer(model, cfg, fused=on_gpu)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=DeepSpeedMPU,
                                      config=deepspeed_config(cfg, info.dp_size, bf16, resume.universal, on_gpu))
    if compiled:
        keep_hooks_eager(engine.module)  # ZeRO 3's per-module hooks
    return engine


def load_resume(engine: Any, resume: Resume, info: DistInfo, loader: Any) -> tuple[int, int]:
    """Engine, buffers, RNG and loader state from the checkpoint; returns (step, tokens seen)."""
    meta, ckpt_dir = resume.meta, resume.ckpt_dir
    assert meta is not None and ckpt_dir is not None
    load_dir = ckpt_lib.ensure_universal(ckpt_dir) if resume.universal else ckpt_dir
    ckpt_lib.load_engine_checkpoint(engine, load_dir, resume.universal)
    ckpt_lib.restore_buffers(engine.module, ckpt_dir, info.tp_rank)
    if meta["world_size"] == info.world_size:
        ckpt_lib.load_rng(ckpt_dir, info.rank)
    loader.load_state_dict(meta["loader"])
    if info.is_main:
        print(f"resumed from {ckpt_dir} at step {meta['step']} (saved at dp={meta['dp']}, now dp={info.dp_size}"
              f"{', via universal checkpoint' if resume.universal else ''})", flush=True)
    return meta["step"], meta["tokens"]


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS of this rank (KiB on Linux)


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Reporter:
    """Logging-step records (metrics.jsonl, TensorBoard, one stdout line) on rank 0; throughput since the
    previous logging step."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, step: int, tokens_per_step: int) -> None:
        self.cfg, self.info, self.tokens_per_step = cfg, info, tokens_per_step
        self.flops_tok = flops_per_token(cfg.model)
        self.peak = peak_flops(info.device)
        self.writer = MetricsWriter(run_dir, resume_step=step) if info.is_main else None
        self.bar = tqdm(total=cfg.train.steps, initial=step, desc="train",
                        disable=not (info.is_main and sys.stderr.isatty()), dynamic_ncols=True)
        self.start_step, self.t_start = step, time.perf_counter()
        self.step_last, self.t_last = step, self.t_start

    def say(self, line: str) -> None:
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def train_record(self, step: int, tokens: int, loss_sum: torch.Tensor, lr: float, engine: Any) -> None:
        """Collective over the DP group (the loss all-reduce); reads the loss: a host sync."""
        t, info = self.cfg.train, self.info
        loss_sum = comm.all_reduce_sum(loss_sum, group=parallel_state.get_data_parallel_group())
        loss = loss_sum.item() / (t.grad_accum_steps * info.dp_size)
        now = time.perf_counter()
        tok_s = (step - self.step_last) * self.tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        gnorm = engine.get_global_grad_norm()
        record: dict[str, Any] = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": float(gnorm) if gnorm is not None else None,
            "tokens_per_s": tok_s, "tokens": tokens, "flops_per_s": tok_s * self.flops_tok,
            "mem_gb": memory_gb(info.device),
        }
        if self.peak:
            record["mfu"] = tok_s * self.flops_tok / (self.peak * info.world_size)
        eta = (t.steps - step) * (now - self.t_start) / max(step - self.start_step, 1)
        if self.writer:
            self.writer.log(record)
            perf = f"mfu {record['mfu']:.1%}" if self.peak else f"{record['flops_per_s'] / 1e9:.2f} GFLOP/s"
            self.say(f"step {step:>7d}  loss {loss:.4f}  lr {lr:.3e}  gnorm {record['grad_norm'] or 0:.3f}  "
                     f"{tok_s:,.0f} tok/s  {perf}  mem {record['mem_gb']:.2f} GB  eta {fmt_eta(eta)}")

    def first_step(self, step: int, t_start: float, compiled: bool) -> None:
        """How long this invocation's first step took, compilation included (one device sync, once)."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        seconds = time.perf_counter() - t_start
        if self.writer:
            self.writer.log({"step": step, "first_step_s": seconds})
            self.say(f"first step: {seconds:.1f} s{' (includes torch.compile)' if compiled else ''}")

    def val_record(self, step: int, val: dict[str, float], dtype: str) -> None:
        """`dtype`: of the weights validated (the training module's; the evaluate CLI runs the fp32 masters, so
        its loss differs from a bf16 run's in the low digits)."""
        if self.writer:
            self.writer.log({"step": step, "val_loss": val["loss"], "val_ppl": val["ppl"], "val_dtype": dtype})
            self.say(f"step {step:>7d}  val loss {val['loss']:.4f}  ppl {val['ppl']:.2f}  ({dtype} weights)")

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()


def _has_val(cfg: Config) -> bool:
    """Whether the dataset has a val split with at least one window. A split that is listed but cannot be
    read is an error (DatasetError), not "no validation"."""
    from tokenformer_dist.data import TokenShards

    if "val" not in TokenShards(cfg.data.path, "train").manifest.get("splits", {}):
        return False
    return TokenShards(cfg.data.path, "val").n_windows(cfg.model.seq_len) > 0


def decide_has_val(cfg: Config) -> bool:
    """Collective: validation (DP, TP and ZeRO 3 collectives) runs on every rank or on none. Rank 0 decides;
    if it validates, every rank must be able to read the val split, or all stop with one line."""
    has_val = comm.decide_on_rank0(lambda: _has_val(cfg))
    if has_val:
        comm.require_on_every_rank(lambda: None if _has_val(cfg) else
                                   f"data.path {cfg.data.path}: no val windows here, but rank 0 validates on them")
    return has_val


def train(args: argparse.Namespace, cfg: Config, destroy: bool = True) -> int:
    """One training run. destroy=False keeps torch.distributed up (several runs in one launch, for tests)."""
    from tokenformer_dist.data import Prefetcher, TokenShards, WindowLoader, check_vocab
    from tokenformer_dist.distributed.launch import destroy_distributed, init_distributed
    from tokenformer_dist.inference.evaluate import evaluate
    from tokenformer_dist.training.profiling import StepProfiler

    t, m = cfg.train, cfg.model
    check_vocab(TokenShards(cfg.data.path, "train").vocab_size, m.vocab_size, cfg.data.path)
    info = init_distributed(cfg.parallel.tp, cfg.parallel.dist_timeout_minutes, seed=t.seed)
    if info.device.type == "cpu":
        tune_cpu_allocator()
    run_dir = Path(args.run_dir or Path("runs") / Path(cfg.source).stem)
    bf16 = cfg.parallel.dtype == "bf16" or (cfg.parallel.dtype == "auto" and info.device.type == "cuda")
    dtype = "bf16" if bf16 else "fp32"  # of the weights the module trains and validates with

    ckpt_lib.check_run_dir_shared(run_dir)
    resume = find_resume(run_dir, info)
    has_val = decide_has_val(cfg)
    engine = build_engine(cfg, info, bf16, resume, args.init_from)
    loader = WindowLoader(cfg.data.path, "train", m.seq_len, t.micro_batch_size, info.dp_rank, info.dp_size,
                          seed=cfg.data.seed)
    step, tokens_seen = load_resume(engine, resume, info, loader) if resume.meta else (0, 0)
    batches = Prefetcher(loader, info.device, cfg.data.prefetch_batches)  # after the loader state is restored

    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * info.dp_size * m.seq_len
    report = Reporter(cfg, info, run_dir, step, tokens_per_step)
    if info.is_main:
        report.say(startup_line(cfg, info.world_size, ranks_per_node(), info.device))
    preempt = Preemption(t.preempt_check_every)
    profiler = (StepProfiler(args.profile, run_dir, info.rank, info.device.type == "cuda", report.say)
                if getattr(args, "profile", None) else None)

    def save() -> None:
        ckpt_lib.save_checkpoint(engine, run_dir, step, cfg, info,
                                 {"tokens": tokens_seen, "loader": batches.state_dict(),
                                  "dtype": dtype}, t.keep_last)

    exit_code = 0
    try:
        while step < t.steps:
            lr = lr_at(step, t.steps, t.lr, t.min_lr, t.warmup_frac)
            t_first = time.perf_counter() if step == report.start_step else None
            loss_sum = train_step(engine, batches, lr, t.grad_accum_steps)
            step += 1
            tokens_seen += tokens_per_step
            report.bar.update(1)
            if profiler:
                profiler.step()
            if step % t.log_every == 0 or step == t.steps:
                report.train_record(step, tokens_seen, loss_sum, lr, engine)
            if t_first is not None:  # after the step's own record, which stays the first of the run
                report.first_step(step, t_first, compiled=compile_on(cfg, info.device.type))
            if has_val and (step % t.eval_every == 0 or step == t.steps):
                report.val_record(step, evaluate(engine.module, cfg.data.path, m.seq_len, t.micro_batch_size,
                                                 t.eval_batches), dtype)
            if preempt.should_stop(step):
                save()
                if info.is_main:
                    report.say(f"preempted: checkpoint saved at step {step}; exiting {EXIT_PREEMPTED} for requeue")
                exit_code = EXIT_PREEMPTED
                break
            if step % t.save_every == 0 and step < t.steps:
                save()
        if exit_code == 0:
            save()
    finally:
        if profiler:
            profiler.close()
        batches.close()
        report.close()
    if destroy:
        destroy_distributed()
    else:
        parallel_state.destroy_model_parallel()
    return exit_code
