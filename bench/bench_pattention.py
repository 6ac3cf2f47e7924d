"""P3 / issue 7: Pattention forward+backward time on CPU (fp32) at owt_124m shapes.

Compares the default training path (lean), the plain-autograd reference, a naive transcription of the
official layer and a same-shape Linear→GeLU→Linear MLP, all measured in this run. Goals: lean ≤ 1.10× the
MLP and faster than the official-style layer (P3); lean ≤ 1.05× the reference (issue 7).

    .venv/bin/python bench/bench_pattention.py [--tokens 2048] [--d 768] [--n 576 2304] [--reps 7]
                                               [--norm l2_norm_gelu] [--threads N] [--variants lean ...]
On a machine whose cores other processes share, use --threads 1: with 2 threads every parallel region
waits for a descheduled thread, which measures the scheduler, not the layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from pattention_variants import make_variants
from tqdm import tqdm

ORDER = ("lean", "reference", "official", "mlp")


def time_fwd_bwd(variants: dict, x: torch.Tensor, grad: torch.Tensor, reps: int, desc: str,
                 order: tuple[str, ...] = ORDER) -> dict:
    """Seconds of one forward+backward (input and parameter grads) per variant: the minimum and the median
    over `reps`, after one warm-up each. The variants take turns within every rep, in ABBA order (reversed
    every other rep), so load from other processes on a shared machine and drift within a rep hit them
    alike; the minimum is the least disturbed figure, the maximum shows the disturbance."""
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in tqdm(range(reps + 1), desc=desc, leave=False, disable=not sys.stderr.isatty()):
        for name in order if i % 2 == 0 else order[::-1]:
            fn, params = variants[name]
            for t in (x, *params):
                t.grad = None
            start = time.perf_counter()
            fn(x).backward(grad)
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t), max(t)) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n", type=int, nargs="+", default=[576, 2304])
    ap.add_argument("--norm", default="l2_norm_gelu", choices=("l2_norm_gelu", "gelu_l2_norm", "softmax"))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--variants", nargs="+", choices=ORDER, default=list(ORDER),
                    help="the variants to time (e.g. lean reference: only those two take turns)")
    args = ap.parse_args()
    order = tuple(v for v in ORDER if v in args.variants)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"CPU fp32, {torch.get_num_threads()} threads, tokens {args.tokens}, d {args.d}, norm {args.norm}, "
        f"{args.reps} forward+backward per variant, load average before: {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    rows = []
    for n in args.n:
        x = torch.randn(args.tokens, args.d, requires_grad=True)
        grad = torch.randn(args.tokens, args.d)
        rows.append((n, time_fwd_bwd(make_variants(args.d, n, args.norm), x, grad, args.reps, f"n={n}", order)))
    ratios = [(a, b) for a, b in (("lean", "mlp"), ("lean", "official"), ("lean", "reference"), ("reference", "mlp"))
              if a in order and b in order]
    for stat, k in (("min", 0), ("median", 1), ("max", 2)):
        print(f"-- {stat} over reps (ms); ratios of the {stat}s")
        print(f"{'n':>6} " + " ".join(f"{name:>10}" for name in order)
              + "".join(f" {f'{a}/{b}':>15}" for a, b in ratios))
        for n, t in rows:
            ms = {name: 1e3 * t[name][k] for name in order}
            print(f"{n:>6} " + " ".join(f"{ms[name]:>10.1f}" for name in order)
                  + "".join(f" {ms[a] / ms[b]:>15.3f}" for a, b in ratios))


if __name__ == "__main__":
    main()
