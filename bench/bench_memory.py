"""Issue 7: memory Pattention keeps for backward, and the peak memory of one owt_124m training step.

1. Bytes autograd keeps for backward per layer (unique storages seen by saved_tensors_hooks, parameters
   excluded), in units of tokens·n·4 (fp32), with and without the layer input X (which other consumers,
   e.g. the Q, K and V Pattentions sharing one LayerNorm output, keep anyway). Goal: lean ≤ 1.1.
2. Peak RSS of one training step (forward, backward, AdamW step) of owt_124m at micro-batch 1, sequence
   1024, fp32 on CPU, TP 1, each implementation in a fresh process, with and without activation
   checkpointing. The second step is measured, with the kernel's peak-RSS mark reset just before it, so
   that model construction and AdamW's first-step state allocation do not hide the activations.

    .venv/bin/python bench/bench_memory.py [--tokens 2048] [--d 768] [--n 576 2304] [--skip-step]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from pattention_variants import make_variants, saved_bytes
from tqdm import tqdm

from tokenformer_dist.distributed.net import free_port
from tokenformer_dist.training.metrics import host_memory_bytes, reset_peak_host_memory

REPO = Path(__file__).resolve().parents[1]
NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
VARIANTS = ("lean", "compiled", "reference", "official", "mlp")


def _status_mb(field: str) -> float:
    return host_memory_bytes(field) / 2**20


def train_step_child(impl: str, ckpt: bool) -> None:
    """Two training steps in this process; the second is measured (AdamW's state already exists, as in
    steady-state training). Prints a JSON line with RSS figures in MiB."""
    from tokenformer_dist.config import load_config
    from tokenformer_dist.model import TokenFormer

    cfg = load_config(str(REPO / "configs/owt_124m.yaml"), [f"model.pattention_impl={impl}"], tp=1)
    model = TokenFormer(cfg.model, seed=1, activation_checkpointing=ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (2, 1, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    out = {"impl": impl, "ckpt": ckpt}
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        reset_peak_host_memory()
        out["rss_before_step_mb"] = _status_mb("VmRSS")
        loss = model(tokens[step, :, :-1], tokens[step, :, 1:])
        loss.backward()
        out["peak_fwd_bwd_mb"] = _status_mb("VmHWM")
        opt.step()
        out["peak_step_mb"] = _status_mb("VmHWM")
        out["loss"] = loss.item()
    out["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(out))


def saved_tables(tokens: int, d: int, ns: list[int]) -> None:
    print(f"Bytes kept for backward per layer, units of tokens·n·4 bytes (tokens {tokens}, d {d}, fp32).")
    print("  'with X' counts the layer input; 'without X' does not (it is shared with other consumers).")
    print(
        f"{'n':>6} {'norm':>13} "
        + " ".join(f"{v + ' w/ X':>14} {v + ' w/o X':>15}" for v in VARIANTS)
    )
    x = torch.randn(tokens, d, requires_grad=True)
    for n in ns:
        unit = tokens * n * 4
        for norm in NORMS:
            variants = make_variants(d, n, norm)
            cells = []
            for name in VARIANTS:
                fn, params = variants[name]
                with_x, without_x = saved_bytes(fn, x, params)
                cells.append(f"{with_x / unit:>14.3f} {without_x / unit:>15.3f}")
            print(f"{n:>6} {norm:>13} " + " ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n", type=int, nargs="+", default=[576, 2304])
    ap.add_argument("--skip-step", action="store_true", help="only the saved-bytes table")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        train_step_child(args.child[0], args.child[1] == "1")
        return
    saved_tables(args.tokens, args.d, args.n)
    if args.skip_step:
        return
    print(
        "\nOne training step of owt_124m (fp32, CPU, TP 1, micro-batch 1, seq 1024, torch AdamW), each "
        "in a fresh process;\nthe 2nd step is measured (AdamW state exists); peaks are the kernel's VmHWM, "
        "reset just before the step."
    )
    print(
        f"{'impl':>10} {'act.ckpt':>8} {'RSS before':>11} {'peak fwd+bwd':>13} {'peak step':>10} "
        f"{'fwd+bwd − before':>17} {'process peak':>13} {'loss':>8}   (MiB)"
    )
    results = {}
    for ckpt in ("0", "1"):
        for impl in tqdm(("reference", "lean"), desc=f"ckpt={ckpt}", leave=False):
            env = {**os.environ, "MASTER_PORT": str(free_port())}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", impl, ckpt],
                capture_output=True,
                text=True,
                env=env,
                timeout=1800,
            )
            if proc.returncode != 0:
                sys.exit(f"training-step child ({impl}, ckpt {ckpt}) failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(impl, ckpt)] = r
            print(
                f"{impl:>10} {ckpt:>8} {r['rss_before_step_mb']:>11.0f} {r['peak_fwd_bwd_mb']:>13.0f} "
                f"{r['peak_step_mb']:>10.0f} {r['peak_fwd_bwd_mb'] - r['rss_before_step_mb']:>17.0f} "
                f"{r['process_peak_mb']:>13.0f} {r['loss']:>8.4f}"
            )
        ref, lean = results[("reference", ckpt)], results[("lean", ckpt)]
        inc = [r["peak_fwd_bwd_mb"] - r["rss_before_step_mb"] for r in (ref, lean)]
        print(
            f"{'':>10} {ckpt:>8} lean/reference: peak of the step "
            f"{lean['peak_step_mb'] / ref['peak_step_mb']:.3f}, fwd+bwd increment {inc[1] / inc[0]:.3f}"
        )


if __name__ == "__main__":
    main()
