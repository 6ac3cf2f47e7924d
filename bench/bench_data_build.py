#!/usr/bin/env python
"""P1: build throughput of data_prep/build.py against the sentencepiece limit, both measured in one run.

Real text: the docstrings/documentation of the installed Python packages (the sample corpus of
data_prep/sample.py). When they hold less than needed, the documents are repeated in order to reach
the size (this is said in the output). A tokenizer is trained once, then:

  * single-core encode rate R1 of that tokenizer on the same text (tokens/s, one process, one thread)
  * Ray builds (--workers nproc) of S >= 90 MB and 4*S: rate = d(tokens) / d(wall time), so fixed
    start-up costs cancel; the fixed cost is t_S - tokens_S / rate
  * the same two builds single-process (--workers 0): the speed-up of Ray over one process
  * P1 ratio = rate / (nproc * R1), goal >= 0.8; fixed cost goal <= 5 s

    .venv/bin/python bench/bench_data_build.py [--small-mb 96] [--work /tmp/tfd-bench-build]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_prep import sample
from data_prep.sources import clean_text

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20


def corpus(work: Path, unique_mb: float) -> tuple[list[str], float]:
    cache = work / "unique.jsonl"
    if not cache.exists():
        docs, total = [], 0
        for t in sample.iter_documents():
            docs.append(t)
            total += len(t.encode())
            if total >= unique_mb * MB:
                break
        cache.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    docs = [json.loads(line)["text"] for line in cache.read_text().splitlines()]
    return docs, sum(len(t.encode()) for t in docs) / MB


def write_input(path: Path, docs: list[str], target_mb: float) -> float:
    """JSONL of `docs` repeated in order until target_mb of text. Returns text MB."""
    total = 0
    with open(path, "w") as f:
        while total < target_mb * MB:
            for t in docs:
                f.write(json.dumps({"text": t}) + "\n")
                total += len(t.encode())
                if total >= target_mb * MB:
                    break
    return total / MB


def encode_rate(model: Path, docs: list[str], seconds: float = 8.0) -> tuple[float, float]:
    """Single-core sentencepiece encode rate on cleaned whole documents, batched like the build:
    (tokens per wall second, tokens per CPU second)."""
    from collections import Counter

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model), num_threads=1)
    texts = [x for x in (clean_text(t, Counter()) for t in docs) if x]
    sp.encode(texts[:50], num_threads=1)  # warm up
    n, t0, c0, i = 0, time.perf_counter(), time.process_time(), 0
    batch, size = [], 0
    while time.perf_counter() - t0 < seconds:
        batch.append(texts[i % len(texts)])
        size += len(batch[-1])
        i += 1
        if size >= 256 * 1024:
            n += sum(map(len, sp.encode(batch, num_threads=1)))
            batch, size = [], 0
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def run_build(
    inp: Path, out: Path, tok: Path, workers: int, keep: Path | None = None
) -> tuple[float, int, float]:
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        str(REPO / "data_prep" / "build.py"),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--tokenizer",
        str(tok),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"build failed: {r.stderr[-2000:]}")
    man = json.loads((out / "manifest.json").read_text())
    tokens = man["splits"]["train"]["tokens"] + man["splits"]["val"]["tokens"]
    task_cpu = man["run"]["task_cpu_seconds"]
    if keep is not None:
        if keep.exists():
            shutil.rmtree(keep)
        out.rename(keep)
    else:
        shutil.rmtree(out)
    return dt, tokens, task_cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-mb", type=float, default=96.0)
    ap.add_argument("--unique-mb", type=float, default=40.0, help="distinct text to collect before repeating")
    ap.add_argument("--vocab-size", type=int, default=32000, help="(50304: not reachable here)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tfd-bench-build"))
    ap.add_argument("--skip-single", action="store_true", help="skip the single-process builds")
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep the large Ray build here (for bench_loader)"
    )
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    nproc = os.cpu_count() or 1

    t = time.time()
    docs, unique = corpus(a.work, a.unique_mb)
    print(
        f"text: {len(docs)} docstring/documentation texts of the installed packages, "
        f"{unique:.1f} MB distinct ({time.time() - t:.0f} s to collect)"
    )
    small, large = a.work / "small.jsonl", a.work / "large.jsonl"
    s_mb = write_input(small, docs, a.small_mb)
    l_mb = write_input(large, docs, 4 * a.small_mb)
    if unique < l_mb:
        print(
            f"note: only {unique:.1f} MB of distinct text on this machine: the inputs repeat it in order "
            f"({s_mb:.0f} MB and {l_mb:.0f} MB)"
        )

    tok = a.work / f"tok{a.vocab_size}.model"
    if not tok.exists():
        t = time.time()
        tdir = a.work / "tok-build"
        if tdir.exists():
            shutil.rmtree(tdir)
        seed_in = a.work / "tok-input.jsonl"
        write_input(seed_in, docs, min(unique, 24))
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "data_prep" / "build.py"),
                "--input",
                str(seed_in),
                "--output",
                str(tdir),
                "--vocab-size",
                str(a.vocab_size),
                "--workers",
                "0",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        shutil.copy(tdir / "tokenizer.model", tok)
        shutil.rmtree(tdir)
        print(f"tokenizer: unigram {a.vocab_size} trained once ({time.time() - t:.0f} s)")

    (r1a, c1a) = encode_rate(tok, docs)
    results = {}
    for workers in [nproc] if a.skip_single else [nproc, 0]:
        ts, ns, cs = run_build(small, a.work / "out", tok, workers)
        tl, nl, cl = run_build(large, a.work / "out", tok, workers, a.keep if workers else None)
        rate = (nl - ns) / (tl - ts)
        fixed = ts - ns / rate
        results[workers] = (rate, fixed, ts, tl, ns, nl, (ns + nl) / (cs + cl))
    (r1b, c1b) = encode_rate(tok, docs)
    r1, c1 = (r1a + r1b) / 2, (c1a + c1b) / 2

    print(
        f"single-core sentencepiece encode: {r1 / 1e6:.2f} M tokens/s (before {r1a / 1e6:.2f}, after "
        f"{r1b / 1e6:.2f}); limit nproc x R1 = {nproc} x {r1 / 1e6:.2f} = {nproc * r1 / 1e6:.2f} M tokens/s"
    )
    for workers, (rate, fixed, ts, tl, ns, nl, cpu_rate) in results.items():
        name = f"Ray, {workers} workers" if workers else "single process (--workers 0)"
        print(
            f"{name}: {s_mb:.0f} MB -> {ns:,} tokens in {ts:.1f} s; "
            f"{l_mb:.0f} MB -> {nl:,} tokens in {tl:.1f} s; "
            f"rate {rate / 1e6:.2f} M tokens/s ({rate / 1e6 * (l_mb - s_mb) / ((nl - ns) / 1e6):.1f} MB/s), "
            f"fixed cost {fixed:.1f} s; in the tasks {cpu_rate / 1e6:.2f} M tokens per CPU second "
            f"= {cpu_rate / c1:.2f} x the encode-only rate per CPU second ({c1 / 1e6:.2f} M)"
        )
    rate, fixed = results[nproc][0], results[nproc][1]
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (1 min) on {nproc} cores")
    print(f"P1 ratio = rate / (nproc x R1) = {rate / (nproc * r1):.2f}  (goal >= 0.8)")
    print(f"P1 fixed start-up cost = {fixed:.1f} s  (goal <= 5 s)")
    if 0 in results:
        print(f"speed-up of the Ray build over a single-process build: {rate / results[0][0]:.2f}x")
        print(f"single-process build rate / R1 = {results[0][0] / r1:.2f}")


if __name__ == "__main__":
    main()
