"""Running the pieces of the progressive-scaling experiment as subprocesses of the real tools: the trainer
(`torchrun -m tokenformer_dist.train`), the expansion tool (`tools/expand_tokens.py`) and the dataset builder
(`data_prep/build.py`), a few at a time (`jobs`), each in dependency order."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tokenformer_dist.distributed.net import free_port
from tokenformer_dist.progressive.ladder import KINDS, REPO


class StepFailed(RuntimeError):
    """A subprocess of the experiment failed; the message names it and its log."""


def _env() -> dict[str, str]:
    # one BLAS thread per process: the ranks (and the concurrent jobs) already occupy the cores
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "RAY_AUTH_MODE": "disabled"}


_print_lock = threading.Lock()
_live: set[subprocess.Popen] = set()  # running subprocesses, terminated if the experiment is interrupted
_live_lock = threading.Lock()


def terminate_all() -> None:
    """Terminate every subprocess still running (a failed or interrupted experiment leaves none behind)."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def run_logged(cmd: list[str], log: Path, what: str, echo: re.Pattern | None = None, prefix: str = "",
               append: bool = False) -> float:
    """Run cmd with stdout+stderr to `log` (appended to with `append`; lines matching `echo` also printed); its
    wall time. StepFailed with the log's tail if it exits non-zero."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("a" if append else "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        with _live_lock:
            _live.add(proc)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if echo is not None and echo.search(line):
                say(f"{prefix}{line.strip()}")
        rc = proc.wait()
        with _live_lock:
            _live.discard(proc)
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise StepFailed(f"{tail}\nerror: {what} failed (exit {rc}); full log: {log}")
    return time.time() - t0


def train(config: Path, overrides: list[str], run_dir: Path, tp: int, init_from: Path | None, label: str,
          resume: bool = False) -> float:
    """One torchrun launch of the trainer through its CLI; returns its wall time. With `resume` the run dir may
    exist: the trainer continues from its latest checkpoint (and its log is appended to)."""
    run_dir.mkdir(parents=True, exist_ok=resume)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_port",
           str(free_port()), "-m", "tokenformer_dist.train", "--config", str(config), "--run-dir", str(run_dir),
           "--tp", str(tp)]
    for kv in overrides:
        cmd += ["--set", kv]
    if init_from is not None:
        cmd += ["--init-from", str(init_from)]
    return run_logged(cmd, run_dir / "train.log", f"training {label}", append=resume)


def expand(src_run: Path, dst: Path, tokens: dict[str, int], tp: int, init: str, seed: int, log: Path) -> float:
    """Grow a finished run's weights to `tokens` with tools/expand_tokens.py; returns its wall time."""
    spec = ",".join(f"{k}={tokens[k]}" for k in KINDS)
    cmd = [sys.executable, str(REPO / "tools" / "expand_tokens.py"), "--ckpt", str(src_run), "--out", str(dst),
           "--tp", str(tp), "--tokens", spec, "--init", init, "--seed", str(seed), "--no-progress"]
    return run_logged(cmd, log, f"expanding {src_run} to {spec} (--init {init})")


def build_dataset(data: Path, build: dict[str, float]) -> None:
    """data_prep/build.py's sample mode (text already on this machine) into `data`."""
    cmd = [sys.executable, str(REPO / "data_prep" / "build.py"), "--output", str(data), "--no-progress"]
    for key in ("sample_mb", "vocab_size", "tokenizer_sample_mb"):
        if key in build:
            value = build[key]
            cmd += [f"--{key.replace('_', '-')}", str(int(value) if key == "vocab_size" else value)]
    say(f"building the dataset {data} (data_prep/build.py, sample text already on this machine)...")
    data.parent.mkdir(parents=True, exist_ok=True)
    log = data.parent / f".{data.name}.build.log"
    t0 = time.time()
    run_logged(cmd, log, f"building the dataset {data}", re.compile(r"^built "), "  ")
    log.unlink()
    say(f"  dataset built in {time.time() - t0:.0f} s")


@dataclass
class Job:
    name: str
    fn: Callable[[], None]
    deps: list[str] = field(default_factory=list)
    cost: float = 1.0  # planned FLOPs, for the progress/ETA line


def run_jobs(jobs: list[Job], workers: int, progress: Callable[[Job, float, float], None]) -> None:
    """Run `jobs` (a DAG by name) with at most `workers` at once; the first failure cancels what has not
    started and is re-raised once the running ones finish. progress(job, done_cost, elapsed) after each. An
    interruption (Ctrl-C, SIGTERM turned into SystemExit by the CLI) terminates the running subprocesses."""
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        for d in j.deps:
            if d not in by_name:
                raise ValueError(f"job {j.name} depends on unknown job {d}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            _drive(pool, list(jobs), workers, progress)
        except BaseException:
            terminate_all()  # so that the pool's shutdown does not wait for them
            raise


def _drive(pool: ThreadPoolExecutor, pending: list[Job], workers: int,
           progress: Callable[[Job, float, float], None]) -> None:
    done: set[str] = set()
    running: dict[Future, Job] = {}
    failure: BaseException | None = None
    done_cost, t0 = 0.0, time.time()
    while pending or running:
        if failure is None:
            for j in [j for j in pending if all(d in done for d in j.deps)][: workers - len(running)]:
                pending.remove(j)
                running[pool.submit(j.fn)] = j
        if not running:
            if failure is None:
                raise RuntimeError(f"jobs can never start (dependency cycle): {[j.name for j in pending]}")
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for fut in finished:
            j = running.pop(fut)
            err = fut.exception()
            if err is not None:
                failure = failure or err
                continue
            done.add(j.name)
            done_cost += j.cost
            progress(j, done_cost, time.time() - t0)
    if failure is not None:
        raise failure
