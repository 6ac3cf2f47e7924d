"""Generation throughput: tokens/s with the per-layer KV cache vs recomputing the whole prefix every token.

    python bench/bench_generate.py [--new-tokens 256] [--prompt 32] [--d-model 256] [--layers 4] [--repeats 2]
                                   [--threads N]

One process, one device (CPU here; CUDA when available), fp32, greedy, a randomly initialized model of the
given size. Both runs must produce the same tokens (checked). The modes alternate in ABBA order over the
repeats (machine noise hits both alike); prints the best run of each mode and the ratio, which is the figure
(the absolute tokens/s depend on the machine; the ratio is measured in the same run).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tokenformer_dist.config import ModelConfig
from tokenformer_dist.inference.generate import generate_ids
from tokenformer_dist.model.tokenformer import TokenFormer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="qkv/proj parameter tokens (ffn: 4x)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per mode, alternating ABBA (best is reported)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      seq_len=args.prompt + args.new_tokens, qkv_tokens=args.tokens, proj_tokens=args.tokens,
                      ffn_tokens=4 * args.tokens)
    model = TokenFormer(cfg, seed=0).to(device).eval()
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model d={cfg.d_model} L={cfg.n_layers} H={cfg.n_heads} tokens {cfg.qkv_tokens}/{cfg.proj_tokens}/"
          f"{cfg.ffn_tokens}, prompt {args.prompt}, {args.new_tokens} new tokens, greedy, fp32, {device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    generate_ids(model, prompt, 8, None, use_cache=True)  # warm-up
    modes = {"recompute prefix": False, "KV cache": True}
    best, outputs = dict.fromkeys(modes, float("inf")), {}
    for r in range(args.repeats):
        for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:  # ABBA
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[mode] = generate_ids(model, prompt, args.new_tokens, None, use_cache=modes[mode])
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[mode] = min(best[mode], time.perf_counter() - start)
    results = {}
    for mode in modes:
        results[mode] = len(outputs[mode]) / best[mode]
        print(f"{mode:>17}: {results[mode]:8.1f} tokens/s  ({best[mode]:.2f} s for {len(outputs[mode])} tokens)")
    if outputs["KV cache"] != outputs["recompute prefix"]:
        raise SystemExit("error: the KV-cache tokens differ from the recomputed ones")
    print(f"same {args.new_tokens} greedy tokens in both modes; KV cache speed-up: "
          f"{results['KV cache'] / results['recompute prefix']:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
