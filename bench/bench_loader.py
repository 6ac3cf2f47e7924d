#!/usr/bin/env python
"""P2: random-window reads/s of tokenformer_dist.data.TokenShards against a plain numpy memmap of the same
tokens, both measured in one run (interleaved, page cache warm for both). Goal: ratio >= 0.5.

    .venv/bin/python bench/bench_loader.py [--data data/sample] [--seq-len 2048] [--reads 100000]

Without --data (and no data/sample), the sample dataset is built first (python data_prep/build.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tokenformer_dist.data import TokenShards, WindowLoader

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO / "data" / "sample")
    ap.add_argument("--split", default="train")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048, 1024])
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not (a.data / "manifest.json").exists():
        print(f"{a.data} missing: building the sample dataset")
        subprocess.run(
            [sys.executable, str(REPO / "data_prep" / "build.py"), "--output", str(a.data)], check=True
        )

    shards = TokenShards(a.data, a.split)
    all_tokens = shards.tokens(0, shards.n_tokens)
    print(
        f"dataset {a.data} [{a.split}]: {shards.n_tokens:,} tokens ({shards.dtype}), "
        f"{-(-shards.n_tokens // shards.chunk)} chunk file(s) of {shards.chunk:,} tokens"
    )
    with tempfile.TemporaryDirectory() as td:
        flat = Path(td) / "tokens.bin"
        all_tokens.tofile(flat)
        mm = np.memmap(flat, dtype=shards.dtype, mode="r")
        for seq in a.seq_len:
            n = shards.n_windows(seq)
            rng = np.random.default_rng(0)
            idx = rng.integers(0, n, size=a.reads).tolist()

            def base(mm=mm, idx=idx, seq=seq):
                for i in idx:
                    s = i * seq
                    np.array(mm[s : s + seq + 1])

            def ours(idx=idx, seq=seq):
                w = shards.window
                for i in idx:
                    w(i, seq)

            for f in (base, ours):  # warm up
                f()
            tb, to = [], []
            for _ in range(a.rounds):  # interleaved, best of rounds: robust to other load on the machine
                t = time.perf_counter()
                base()
                tb.append(time.perf_counter() - t)
                t = time.perf_counter()
                ours()
                to.append(time.perf_counter() - t)
            rb, ro = a.reads / min(tb), a.reads / min(to)
            assert all(
                np.array_equal(shards.window(i, seq), mm[i * seq : i * seq + seq + 1]) for i in idx[:1000]
            )
            print(
                f"seq_len {seq}: numpy memmap {rb:,.0f} windows/s; TokenShards.window {ro:,.0f} windows/s; "
                f"P2 ratio {ro / rb:.2f} (goal >= 0.5)"
            )
            mbs = 8
            ld = WindowLoader(a.data, a.split, seq, mbs, 0, 1, seed=0)
            it = iter(ld)
            nb = max(1, min(2000, a.reads // mbs))
            t = time.perf_counter()
            for _ in range(nb):
                next(it)
            dt = time.perf_counter() - t
            print(
                f"  WindowLoader (shuffled, micro-batch {mbs}, int64 tensors): {nb / dt:,.0f} batches/s = "
                f"{nb * mbs / dt:,.0f} windows/s"
            )


if __name__ == "__main__":
    main()
