#!/usr/bin/env python
"""Where the sample build's time goes, and Ray's start-up and shutdown as data_prep/build.py does them
(docs/data.md: the sample build, and P1's fixed cost).

    .venv/bin/python bench/bench_ray_start.py [--rounds 3] [--sample-mb 5] [--work /tmp/tfd-bench-ray]

  1. collecting the sample corpus (data_prep.sample.write_sample_text, the build's own first step);
  2. the whole sample build, `data_prep/build.py --output WORK/sample --overwrite --no-progress`, in a fresh
     process: its wall time, and the tokenizer time its log prints;
  3. `rounds` Ray start-ups and shutdowns in this process, through the build's own `RayRunner` (ray.init of
     a private local Ray with the build's settings and temp dir; its close() is ray.shutdown()).
The machine's load average is printed first: on a shared machine every figure moves with it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_prep.runners import RayRunner
from data_prep.sample import write_sample_text

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="Ray start-ups (and shutdowns) timed")
    ap.add_argument("--sample-mb", type=float, default=5.0, help="the build's --sample-mb (its default: 5)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tfd-bench-ray"))
    a = ap.parse_args()
    if a.rounds < 1 or a.sample_mb <= 0:
        ap.error("--rounds must be >= 1 and --sample-mb > 0")
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")

    t0 = time.perf_counter()
    _, n_docs, n_bytes = write_sample_text(a.work / "text", int(a.sample_mb * MB))
    print(f"collecting the sample text: {n_docs} documents, {n_bytes / MB:.1f} MB in {time.perf_counter() - t0:.1f} s")

    cmd = [sys.executable, str(REPO / "data_prep" / "build.py"), "--output", str(a.work / "sample"),
           "--sample-mb", str(a.sample_mb), "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: the sample build failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    tok = re.search(r"tokenizer trained in ([0-9.]+) s", proc.stderr)
    print(f"sample build (data_prep/build.py, fresh process, imports included): {took:.1f} s; tokenizer "
          f"trained in {tok.group(1) if tok else '?'} s (its log)")

    inits, shutdowns = [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        runner = RayRunner(None, None, a.work / "ray_out", 1 * MB)
        t1 = time.perf_counter()
        runner.close()
        inits.append(t1 - t0)
        shutdowns.append(time.perf_counter() - t1)
    first = " (the first includes importing Ray)" if a.rounds > 1 else ""
    print(f"Ray start-up as the build does it (RayRunner: ray.init, local, {os.cpu_count()} CPUs), {a.rounds} "
          f"rounds{first}: init {' '.join(f'{t:.1f}' for t in inits)} s; shutdown "
          f"{' '.join(f'{t:.1f}' for t in shutdowns)} s")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
