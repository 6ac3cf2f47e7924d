#!/usr/bin/env python
"""Issue 19's CPU-checkable proxy: what one training step (forward + backward) launches, eager vs compiled.

    .venv/bin/python bench/bench_step_kernels.py [--config configs/owt_124m.yaml] [--micro-batch 8]
        [--dtype bf16|fp32] [--eager-device cpu|meta]

eager     aten ops the plain TokenFormer dispatches (tokenformer_dist.planning.census.eager_census: each costs host time
          on a GPU, where eager owt_124m is host-bound); also how many of them are not views
compiled  kernels the regionally compiled model launches (census.compiled_census: Inductor's generated
          kernels and extern calls, measured by running it under torch.profiler with per-kernel records,
          plus the ops dispatched outside the compiled regions)
bytes     elementwise (non-matmul) bytes read and written per step, from the same two censuses

Both censuses run here, on the CPU, in the trainer's dtype (bf16 by default, as on a GPU), at the same
shapes. Inductor's CPU (C++) kernels stand in for its Triton kernels: the fusion is decided by the same
scheduler, the kernel boundaries can differ. Goal (issue 19): compiled ≤ 1/6 of eager. The last line is one
JSON object: {"config", "micro_batch", "eager_ops", "compiled_kernels", "ratio", "eager_bytes",
"compiled_bytes"}.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from tokenformer_dist.config import load_config
from tokenformer_dist.planning.census import compiled_census, eager_census

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--config", default="configs/owt_124m.yaml")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--eager-device", choices=("cpu", "meta"), default="cpu",
                    help="meta: shapes only (seconds), but attention takes SDPA's unfused math path there")
    ap.add_argument("--layers", type=int, default=None, help="override model.n_layers (a quicker look)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    m = cfg.model if args.layers is None else replace(cfg.model, n_layers=args.layers)
    dtype = DTYPES[args.dtype]
    tokens = args.micro_batch * m.seq_len
    print(f"{cfg.source}: d {m.d_model}, {m.n_layers} layers, n {m.qkv_tokens}/{m.proj_tokens}/{m.ffn_tokens}, "
          f"micro-batch {args.micro_batch} x {m.seq_len} = {tokens} tokens, {args.dtype}, TP 1, forward + backward")

    t0 = time.perf_counter()
    eager = eager_census(m, args.micro_batch, dtype, args.eager_device)
    views = eager.views
    print(f"eager ({args.eager_device}, {time.perf_counter() - t0:.0f} s): {eager.launches:,} aten ops dispatched "
          f"({eager.launches - views:,} not views; {eager.matmuls} matmul/attention), "
          f"{eager.elementwise_bytes / 1e9:.2f} GB elementwise")
    print("  most dispatched: " + ", ".join(f"{k} {v}" for k, v in eager.by_name.most_common(12)))

    t0 = time.perf_counter()
    compiled = compiled_census(m, args.micro_batch, dtype)
    print(f"compiled (cpu, {time.perf_counter() - t0:.0f} s incl. compilation): {compiled.launches:,} launches "
          f"({compiled.matmuls} matmul/attention), {compiled.elementwise_bytes / 1e9:.2f} GB elementwise")
    print("  launches: " + ", ".join(f"{k} {v}" for k, v in compiled.by_name.most_common(12)))
    per_block, rest = compiled.per_layer(m.n_layers)
    print(f"  per block {per_block:.1f} launches (of which {sum(compiled.outside.values()) // m.n_layers} views "
          f"outside the graphs), outside the blocks {rest:.0f}; ops outside the compiled regions: "
          + ", ".join(f"{k} {v}" for k, v in compiled.outside.most_common()))
    for g in compiled.graphs:
        print(f"  graph run {g.calls}x: {g.launches} launches, {g.elementwise_bytes / 1e6:.1f} MB elementwise per run")

    ratio = compiled.launches / eager.launches
    print(f"compiled / eager: launches {ratio:.3f} (1/{1 / ratio:.1f}; goal <= 1/6), against eager's non-view ops "
          f"{compiled.launches / (eager.launches - views):.3f}; elementwise bytes "
          f"{compiled.elementwise_bytes / eager.elementwise_bytes:.3f}")
    print(json.dumps({"config": cfg.source, "micro_batch": args.micro_batch, "eager_ops": eager.launches,
                      "compiled_kernels": compiled.launches, "ratio": round(ratio, 4),
                      "eager_bytes": eager.elementwise_bytes, "compiled_bytes": compiled.elementwise_bytes}))


if __name__ == "__main__":
    main()
