#!/usr/bin/env python
"""P5: CPU training throughput at TP 1 — the trainer's stack against plain single-device PyTorch.

    .venv/bin/python bench/bench_train_throughput.py [--steps 1] [--rounds 40] [--threads N]
        [--no-allocator-tuning] [--compile] [--set model.d_model=256 ...]

Both sides train the same TokenFormer (same shapes, same init) with torch AdamW (same decay groups, same
lr) and gradient clipping on the same tokens, in ONE process (same threads, same allocator settings):
  ours:     TokenFormer (megatron-core layers) inside a DeepSpeed ZeRO-1 engine, gloo world of 1, stepped by
            the trainer's own `trainer.train_step`, after the trainer's own process set-up
            (`allocator.tune_cpu_allocator`, process-wide, so the baseline gets it too)
  baseline: plain nn.Modules (nn.Embedding, single-device `pattention` math, SDPA, F.cross_entropy),
            torch AdamW, clip_grad_norm_ — no megatron, no DeepSpeed
With --compile both sides are compiled the same way, region by region (each block with `Module.compile`, as
model/compile.py does for ours, and the loss head), on Inductor's CPU backend.
Rounds are short and alternate the order (ABBA) so that machine noise hits both alike; prints tokens/s of
each, the median over rounds of the wall-clock ratio ours/baseline (the P5 figure, goal >= 0.95), the
ratio of process CPU time per token (less sensitive to other processes on a shared machine), and the
losses of both after the same steps (equal: same math and optimizer).

`--parts` (docs/training.md, "Where the time went"; use with --threads 1) instead times each part of a step
on both sides, in ABBA rounds: forward + backward and the optimizer step (clip + AdamW; ours: DeepSpeed's
`engine.step`), as process CPU ms and minor page faults per step (medians), then the cross entropy alone
on this micro-batch's logits (F.cross_entropy against megatron-core's vocab_parallel_cross_entropy, the
formula ours used at TP 1 before it switched to F.cross_entropy), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenformer_dist.config import ModelConfig, load_config
from tokenformer_dist.model.init import master_normal, value_init_std
from tokenformer_dist.model.pattention import pattention

DEFAULTS = [
    "model.d_model=256",
    "model.n_heads=4",
    "model.n_layers=4",
    "model.seq_len=256",
    "model.qkv_tokens=256",
    "model.proj_tokens=256",
    "model.ffn_tokens=1024",
    "train.micro_batch_size=8",
    "parallel.tp=1",
]


class PlainPattention(torch.nn.Module):
    def __init__(self, name: str, d: int, n: int, norm: str, key_std: float, value_std: float, seed: int):
        super().__init__()
        self.key_tokens = torch.nn.Parameter(master_normal(f"{name}.key_tokens", (n, d), key_std, seed))
        self.value_tokens = torch.nn.Parameter(master_normal(f"{name}.value_tokens", (n, d), value_std, seed))
        self.register_buffer("tau", torch.tensor(math.sqrt(n)))
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, self.key_tokens, self.value_tokens, self.tau, self.norm)


def rotate(x: torch.Tensor, rot: int, base: float) -> torch.Tensor:
    """Rotary embedding on the first `rot` dims of each head (non-interleaved halves, as megatron)."""
    s = x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat([xr * cos + torch.cat([-x2, x1], dim=-1) * sin, xp], dim=-1)


class PlainBlock(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, seed: int):
        super().__init__()
        d, vs = cfg.d_model, value_init_std(cfg.n_layers, cfg.d_model)
        mk = lambda name, n: PlainPattention(f"blocks.{i}.{name}", d, n, cfg.norm, cfg.init_std, vs, seed)
        self.q, self.k, self.v = (
            mk("attn.query", cfg.qkv_tokens),
            mk("attn.key", cfg.qkv_tokens),
            mk("attn.value", cfg.qkv_tokens),
        )
        self.proj, self.ffn = mk("attn.proj", cfg.proj_tokens), mk("ffn", cfg.ffn_tokens)
        self.h, self.hd, self.cfg = cfg.n_heads, d // cfg.n_heads, cfg
        self.rot = int(self.hd * cfg.rotary_pct)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = F.layer_norm(x, (d,), eps=self.cfg.ln_eps)
        q, k, v = (t.view(b, s, self.h, self.hd).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        if self.rot:
            q, k = rotate(q, self.rot, self.cfg.rotary_base), rotate(k, self.rot, self.cfg.rotary_base)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        return x + self.ffn(F.layer_norm(x, (d,), eps=self.cfg.ln_eps))


class PlainTokenFormer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
        with torch.no_grad():
            self.embedding.weight.copy_(
                master_normal("embedding.weight", (cfg.vocab_size, cfg.d_model), cfg.init_std, seed)
            )
        self.blocks = torch.nn.ModuleList(PlainBlock(cfg, i, seed) for i in range(cfg.n_layers))
        self.final_norm = torch.nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x, self.embedding.weight, labels)

    def head(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.final_norm(x) @ weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def compile_regions(self) -> None:
        for blk in self.blocks:
            blk.compile(dynamic=False)
        self.head = torch.compile(self.head, dynamic=False)


def adamw(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.adam_eps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--compile", action="store_true", help="compile both sides (regional, Inductor)")
    parser.add_argument("--no-allocator-tuning", action="store_true",
                        help="skip the trainer's glibc allocator settings (to measure what they bring)")
    parser.add_argument("--parts", action="store_true",
                        help="time each part of a step (forward+backward, optimizer step, cross entropy) instead")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, DEFAULTS + args.overrides)
    m, t = cfg.model, cfg.train

    import deepspeed
    from megatron.core import parallel_state

    from tokenformer_dist.distributed.deepspeed_config import deepspeed_config
    from tokenformer_dist.distributed.launch import DeepSpeedMPU, init_distributed
    from tokenformer_dist.model import TokenFormer, parallelize
    from tokenformer_dist.training.allocator import tune_cpu_allocator
    from tokenformer_dist.training.optim import build_optimizer
    from tokenformer_dist.training.trainer import train_step

    os.environ.setdefault("MASTER_PORT", "29561")
    init_distributed(1)
    tuned = False if args.no_allocator_tuning else tune_cpu_allocator()  # as train.train() does on CPU
    ours_model = parallelize(TokenFormer(m, seed=t.seed), parallel_state.get_tensor_model_parallel_group())
    if args.compile:
        from tokenformer_dist.model.compile import compile_model

        compile_model(ours_model)
    optimizer = build_optimizer(ours_model, cfg, fused=False)
    engine, *_ = deepspeed.initialize(
        model=ours_model, optimizer=optimizer, mpu=DeepSpeedMPU, config=deepspeed_config(cfg, 1, False, False)
    )
    base = PlainTokenFormer(m, t.seed)
    if args.compile:
        base.compile_regions()
    base_opt = adamw(base, t)

    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_len + 1), generator=gen)
    batches = itertools.repeat(batch)
    host = torch.device("cpu")

    def ours_step() -> float:
        return train_step(engine, batches, t.lr, 1).item()

    def base_step() -> float:
        for group in base_opt.param_groups:
            group["lr"] = t.lr
        tokens = batch.to(host)
        loss = base(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), t.grad_clip)
        base_opt.step()
        base_opt.zero_grad(set_to_none=True)
        return loss.item()

    if args.parts:
        part_breakdown(engine, base, base_opt, batch, cfg, args.rounds, tuned)
        return
    l_ours, l_base = ours_step(), base_step()  # warm-up; the first losses agree: same init, same math
    print(
        f"model d={m.d_model} L={m.n_layers} seq={m.seq_len} micro={t.micro_batch_size} fp32, "
        f"{'compiled' if args.compile else 'eager'}, "
        f"threads={torch.get_num_threads()}, allocator tuning {'on' if tuned else 'off'}; "
        f"first-step loss ours {l_ours:.5f} baseline {l_base:.5f}"
    )
    sides = {"baseline": base_step, "ours": ours_step}
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    cpu: dict[str, float] = {"baseline": 0.0, "ours": 0.0}
    check: dict[str, float] = {}
    done = {"baseline": 1, "ours": 1}  # steps taken, warm-up included
    check_at = min(6, 1 + args.rounds * args.steps)
    for r in tqdm(range(args.rounds), desc="rounds", disable=not sys.stderr.isatty()):
        for name in ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline"):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                loss = sides[name]()
                done[name] += 1
                if done[name] == check_at:
                    check[name] = loss
            times[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
    # Same optimizer (decay groups, clipping, which is active in the first steps): the losses still agree
    # after a few steps. Later they drift apart (chaotically: Adam rescales float-rounding differences).
    rel = abs(check["ours"] - check["baseline"]) / abs(check["baseline"])
    print(f"loss after {check_at} steps: ours {check['ours']:.5f} baseline {check['baseline']:.5f} "
          f"(rel diff {rel:.1e})")
    tok = args.steps * t.micro_batch_size * m.seq_len  # per side per round
    ratios = [b / o for o, b in zip(times["ours"], times["baseline"], strict=True)]
    base_tps, ours_tps = (len(times[k]) * tok / sum(times[k]) for k in ("baseline", "ours"))
    print(f"baseline (plain PyTorch) {base_tps:,.0f} tokens/s")
    print(f"ours (megatron TP1 + DeepSpeed ZeRO-1) {ours_tps:,.0f} tokens/s")
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(f"ratio per round: quartiles {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}; CPU-time ratio {cpu['baseline'] / cpu['ours']:.3f}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"ratio ours/baseline {statistics.median(ratios):.3f} (median of {args.rounds} rounds; goal >= 0.95)")


class PartTimer:
    """Process CPU time (ms) and minor page faults of each timed call, per part name."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {}
        self.faults: dict[str, list[int]] = {}

    def __call__(self, name: str, fn):
        f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        out = fn()
        self.ms.setdefault(name, []).append((time.process_time() - c0) * 1e3)
        self.faults.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return out

    def line(self, name: str) -> str:
        return f"{statistics.median(self.ms[name]):8.1f} ms {statistics.median(self.faults[name]):>8,.0f} faults"


def part_breakdown(engine, base, base_opt, batch: torch.Tensor, cfg, rounds: int, tuned: bool) -> None:
    """--parts: each part of one step on both sides (ABBA rounds, medians), then the cross entropy alone."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    t, m = cfg.train, cfg.model
    x, y = batch[:, :-1], batch[:, 1:]
    timer = PartTimer()

    def ours_parts() -> None:
        for group in engine.optimizer.param_groups:
            group["lr"] = t.lr

        def fwd_bwd() -> None:
            engine.backward(engine(x, y))

        timer("ours fwd+bwd", fwd_bwd)
        timer("ours step", engine.step)

    def base_parts() -> None:
        for group in base_opt.param_groups:
            group["lr"] = t.lr
        timer("baseline fwd+bwd", lambda: base(x, y).backward())

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(base.parameters(), t.grad_clip)
            base_opt.step()
            base_opt.zero_grad(set_to_none=True)

        timer("baseline step", step)

    logits = torch.randn(x.numel(), m.vocab_size, generator=torch.Generator().manual_seed(1))
    labels = y.flatten()

    def fused_ce() -> None:
        z = logits.clone().requires_grad_()
        F.cross_entropy(z, labels).backward()

    def megatron_ce() -> None:
        z = logits.clone().requires_grad_()
        vocab_parallel_cross_entropy(z, labels).mean().backward()

    ours_parts()  # warm-up, not timed
    base_parts()
    timer = PartTimer()
    for r in tqdm(range(rounds), desc="rounds", disable=not sys.stderr.isatty()):
        for side in (base_parts, ours_parts) if r % 2 == 0 else (ours_parts, base_parts):
            side()
        for name, fn in (("F.cross_entropy", fused_ce), ("megatron", megatron_ce))[:: 1 if r % 2 == 0 else -1]:
            timer(name, fn)
    print(f"model d={m.d_model} L={m.n_layers} seq={m.seq_len} micro={t.micro_batch_size} fp32, "
          f"threads={torch.get_num_threads()}, allocator tuning {'on' if tuned else 'off'}; median of {rounds} "
          f"ABBA rounds, process CPU time and minor page faults per step")
    print(f"{'part':<20}{'baseline (plain PyTorch)':>30}{'ours (ZeRO-1 engine)':>30}")
    print(f"{'forward + backward':<20}{timer.line('baseline fwd+bwd'):>30}{timer.line('ours fwd+bwd'):>30}")
    print(f"{'clip + AdamW step':<20}{timer.line('baseline step'):>30}{timer.line('ours step'):>30}")
    print(f"cross entropy fwd+bwd on [{x.numel()}, {m.vocab_size}] logits: F.cross_entropy "
          f"{statistics.median(timer.ms['F.cross_entropy']):.1f} ms, megatron vocab_parallel_cross_entropy "
          f"{statistics.median(timer.ms['megatron']):.1f} ms")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
