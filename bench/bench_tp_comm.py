"""P4: bytes each rank sends per transformer layer (forward + backward) at TP 2 and 4.

Runs one TokenFormerBlock (owt_124m shapes: d 768, 12 heads, 576/576/2304 parameter tokens) forward and
backward in real gloo processes under torchrun, wraps every torch.distributed collective (and megatron's
bound aliases of them) to record each call actually issued, and converts each call to the bytes one rank
sends with ring algorithms: all-reduce of N elements 2(tp−1)/tp·N, reduce-scatter (N = input) and
all-gather (N = output) (tp−1)/tp·N. The bytes are COUNTED from the collectives issued (their shapes), not
measured on the wire. Compares with the analytic minimum derived in docs/tensor_parallel.md, and counts
Megatron's dense layer (Column/RowParallelLinear attention + 4d MLP) the same way.

    .venv/bin/python bench/bench_tp_comm.py [--tp 2 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import torch

from tokenformer_dist.distributed.net import free_port
from tokenformer_dist.planning.plan import tp_layer_comm_bytes

REPO = Path(__file__).resolve().parents[1]
D, HEADS, QKV, PROJ, FFN = 768, 12, 576, 576, 2304

# ---- counting ----------------------------------------------------------------------------------------
_state = threading.local()
PHASE = {"name": "idle"}
LOG: list[dict] = []
_SIZE_ARG = {  # collective -> (how N is read from the call, ring factor relative to (tp-1)/tp)
    "all_reduce": (lambda a, k: a[0].numel(), 2),
    "reduce_scatter_tensor": (lambda a, k: a[1].numel(), 1),
    "_reduce_scatter_base": (lambda a, k: a[1].numel(), 1),
    "all_gather_into_tensor": (lambda a, k: a[0].numel(), 1),
    "_all_gather_base": (lambda a, k: a[0].numel(), 1),
    "all_gather": (lambda a, k: sum(t.numel() for t in a[0]), 1),
    "reduce_scatter": (lambda a, k: sum(t.numel() for t in a[1]), 1),
}
_OTHER = ("broadcast", "all_to_all_single", "all_to_all", "reduce", "gather", "scatter", "send", "recv")


def _wrap(name: str, fn):
    def counted(*args, **kwargs):
        if getattr(_state, "depth", 0):  # a wrapped collective calling another: count the outer one
            return fn(*args, **kwargs)
        import torch.distributed as dist

        group = kwargs.get("group") or (args[2] if name == "all_reduce" and len(args) > 2 else None)
        p = dist.get_world_size(group)
        tensor = args[0] if not isinstance(args[0], list) else args[0][0]
        if name in _SIZE_ARG and p > 1:
            size_of, factor = _SIZE_ARG[name]
            n = size_of(args, kwargs)
            LOG.append(
                {
                    "phase": PHASE["name"],
                    "op": name,
                    "elements": n,
                    "tp": p,
                    "bytes": factor * (p - 1) / p * n * tensor.element_size(),
                }
            )
        elif p > 1:
            LOG.append({"phase": PHASE["name"], "op": name, "elements": -1, "tp": p, "bytes": float("nan")})
        _state.depth = 1
        try:
            return fn(*args, **kwargs)
        finally:
            _state.depth = 0

    return counted


def install_counters() -> None:
    import megatron.core.tensor_parallel.mappings as mappings
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in (*_SIZE_ARG, *_OTHER) if hasattr(dist, name)}
    for name, fn in originals.items():
        setattr(dist, name, _wrap(name, fn))
    # megatron binds these at import time: wrap its aliases too (the reentrancy guard avoids doubles)
    for alias in ("dist_all_gather_func", "dist_reduce_scatter_func"):
        fn = getattr(mappings, alias)
        setattr(mappings, alias, _wrap(fn.__name__, fn))


# ---- the analytic minimum (docs/tensor_parallel.md §3; the planner uses the same function) ------------
def analytic_bytes(tp: int, tokens: int, norm: str) -> dict[str, float]:
    """Per layer, per rank, fp32: tokenformer_dist.planning.plan.tp_layer_comm_bytes, which this script verifies."""
    return tp_layer_comm_bytes(D, tp, tokens, norm, elem_bytes=4)


# ---- worker (under torchrun) ---------------------------------------------------------------------------
def megatron_dense_block(tp: int):
    """Megatron's dense layer: column-parallel QKV, attention over local heads, row-parallel proj, 4d MLP."""
    import torch.nn.functional as F
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(
        tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32
    )
    init = torch.nn.init.xavier_normal_
    qkv = ColumnParallelLinear(D, 3 * D, config=cfg, init_method=init, bias=False, gather_output=False)
    proj = RowParallelLinear(
        D, D, config=cfg, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=True
    )
    fc1 = ColumnParallelLinear(D, 4 * D, config=cfg, init_method=init, bias=False, gather_output=False)
    fc2 = RowParallelLinear(
        4 * D, D, config=cfg, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=True
    )
    heads = HEADS // tp

    def block(x: torch.Tensor) -> torch.Tensor:  # x [s, b, d]
        s, b, _ = x.shape
        h = F.layer_norm(x, (D,))
        q, k, v = qkv(h)[0].view(s, b, heads, 3, D // HEADS).unbind(3)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3).reshape(s, b, -1)
        x = x + proj(a)[0]
        return x + fc2(F.gelu(fc1(F.layer_norm(x, (D,)))[0]))[0]

    return block


def worker(tokens: int) -> None:
    from megatron.core import parallel_state

    from tokenformer_dist.config import ModelConfig
    from tokenformer_dist.distributed.launch import destroy_distributed, init_distributed
    from tokenformer_dist.model import parallelize
    from tokenformer_dist.model.tokenformer import TokenFormerBlock

    info = init_distributed(int(os.environ["WORLD_SIZE"]))
    install_counters()
    result = {"tp": info.tp_size, "runs": {}}
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, tokens, D, generator=gen)
    grad = torch.randn(1, tokens, D, generator=gen)
    for norm in ("l2_norm_gelu", "softmax"):
        for impl in ("lean", "reference"):
            cfg = ModelConfig(
                d_model=D,
                n_heads=HEADS,
                qkv_tokens=QKV,
                proj_tokens=PROJ,
                ffn_tokens=FFN,
                norm=norm,
                seq_len=tokens,
                pattention_impl=impl,
            )
            block = parallelize(TokenFormerBlock(cfg), parallel_state.get_tensor_model_parallel_group())
            x = x0.clone().requires_grad_()
            LOG.clear()
            PHASE["name"] = "fwd"
            out = block(x)
            PHASE["name"] = "bwd"
            out.backward(grad)
            PHASE["name"] = "idle"
            result["runs"][f"{norm}/{impl}"] = list(LOG)
    dense = megatron_dense_block(info.tp_size)
    x = x0.transpose(0, 1).clone().requires_grad_()
    LOG.clear()
    PHASE["name"] = "fwd"
    out = dense(x)
    PHASE["name"] = "bwd"
    out.backward(grad.transpose(0, 1))
    result["runs"]["megatron_dense"] = list(LOG)
    if info.rank == 0:
        print("RESULT " + json.dumps(result))
    destroy_distributed()


# ---- driver --------------------------------------------------------------------------------------------
def summarize(ops: list[dict], phase: str) -> tuple[float, str]:
    sel = [o for o in ops if o["phase"] == phase]
    counts: dict[str, int] = defaultdict(int)
    for o in sel:
        counts[f"{o['op']}[{o['elements']}]"] += 1
    return sum(o["bytes"] for o in sel), ", ".join(f"{v}×{k}" for k, v in sorted(counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=128, help="sequence length (micro-batch 1)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.tokens)
        return
    print(
        f"Bytes sent per rank per layer, fp32, {args.tokens} tokens (micro-batch 1), d {D}, heads {HEADS}, "
        f"tokens {QKV}/{PROJ}/{FFN}; ring-algorithm cost of each collective actually issued"
    )
    for tp in args.tp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(tp),
            "--master_port",
            str(free_port()),
            __file__,
            "--worker",
            "--tokens",
            str(args.tokens),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"torchrun TP {tp} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        runs = json.loads(line[len("RESULT ") :])["runs"]
        print(f"\n== TP {tp} ==")
        print(
            f"{'layer':>26} {'phase':>5} {'counted B/token':>17} {'analytic B/token':>17} {'ratio':>6}  "
            f"collectives issued (op[elements])"
        )
        for name, ops in runs.items():
            norm = name.split("/")[0]
            expect = analytic_bytes(tp, args.tokens, norm)
            for phase in ("fwd", "bwd"):
                got, detail = summarize(ops, phase)
                want = expect["megatron_dense"] / 2 if name == "megatron_dense" else expect[phase]
                print(
                    f"{name:>26} {phase:>5} {got / args.tokens:>17.1f} {want / args.tokens:>17.1f} "
                    f"{got / want:>6.3f}  {detail}"
                )
        tf = sum(o["bytes"] for o in runs["l2_norm_gelu/lean"])
        mg = sum(o["bytes"] for o in runs["megatron_dense"])
        print(f"TokenFormer layer (l2_norm_gelu, lean) / Megatron dense layer, fwd+bwd bytes: {tf / mg:.3f}")


if __name__ == "__main__":
    main()
