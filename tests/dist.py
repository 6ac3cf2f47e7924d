"""Launch real multi-process gloo jobs with torchrun (shared by the distributed tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenformer_dist.distributed.net import free_port

REPO = Path(__file__).resolve().parents[1]
# the repo first, then whatever the caller had (bench/gpu_acceptance.sh puts its wheels there)
REPO_PYTHONPATH = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
DIST_SCRIPTS = REPO / "tests" / "dist_scripts"
# the tiny model of the TP tests (ModelConfig fields): 6 heads, so TP 4 needs a micro-batch of 2
TINY_MODEL = dict(vocab_size=256, d_model=48, n_layers=2, n_heads=6, seq_len=16, qkv_tokens=32, proj_tokens=32,
                  ffn_tokens=64)


def torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 300,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes; fail the test with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_PYTHONPATH, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-8000:]}")
    return proc
