"""Shared pieces of the trainer tests: a built sample dataset, trainer argv, torchrun launches, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist import DIST_SCRIPTS, REPO, REPO_PYTHONPATH, free_port

TINY = str(REPO / "configs" / "tiny.yaml")
MULTI = DIST_SCRIPTS / "train_multi.py"


def build_sample(out: Path) -> Path:
    """A small real dataset through data_prep/build.py's sample mode (vocab 8192)."""
    cmd = [sys.executable, str(REPO / "data_prep" / "build.py"), "--output", str(out), "--sample-mb", "1",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "RAY_AUTH_MODE": "disabled"})
    if proc.returncode != 0:
        pytest.fail(f"data_prep/build.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def train_argv(data: Path, run_dir: Path, steps: int, tp: int, zero: int = 1, **sets: object) -> list[str]:
    """Trainer argv on the tiny config, shrunk for speed (seq 64), logging every step."""
    base = {"train.log_every": 1, "model.seq_len": 64, "train.micro_batch_size": 4, "train.eval_every": 10**6,
            "train.save_every": 10**6, "train.warmup_frac": 0.1}
    argv = ["--config", TINY, "--data", str(data), "--run-dir", str(run_dir), "--steps", str(steps),
            "--tp", str(tp), "--zero-stage", str(zero)]
    for key, value in {**base, **sets}.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_PYTHONPATH}


def launch_runs(nproc: int, runs: list[list[str]], timeout: float = 300, check: bool = True,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Several trainer runs, one after another, in one torchrun launch."""
    proc = subprocess.run(torchrun_cmd(nproc, str(MULTI), json.dumps(runs)), capture_output=True, text=True,
                          timeout=timeout, env={**env(), **(extra_env or {})}, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                    f"{proc.stderr[-6000:]}")
    return proc


def start_train(nproc: int, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = torchrun_cmd(nproc, "-m", "tokenformer_dist.train", *argv)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**env(), **(extra_env or {})}, cwd=REPO)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = max(losses(run_dir), default=0)
        if done >= step:
            return done
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.02)
    pytest.fail(f"step {step} not reached in {timeout} s")


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """{global rank: pid} of torchrun's worker processes (read from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != torchrun_pid:
                continue
            envs = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in envs:
            out[int(envs["RANK"])] = int(entry.name)
    return out
