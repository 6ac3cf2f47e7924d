"""What a real cluster does differently from one CPU machine, on this machine.

* Two torchrun agents ("nodes", one rank each) given different views of the run directory and dataset, in
  one launch of both: a run directory that is not shared stops both ranks at start-up with one line naming
  the node; a node whose `checkpoints/latest` is stale resumes from rank 0's checkpoint (losses equal the
  uninterrupted run's); a node that cannot see the val split stops both with one line. Nothing waits for a
  collective timeout: every wait here is bounded.
* The process groups the GPU start-up path creates (NCCL only, bound to the rank's device), with torch.cuda
  faked on this CPU machine, and those of the real CPU path.
* The rendezvous port rule, and owt_124m's checkpoint cadence against the planner's step time.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist import REPO
from tests.dist_scripts.train_helpers import MULTI, env, launch_runs, losses, train_argv
from tokenformer_dist.config import load_config
from tokenformer_dist.distributed import comm
from tokenformer_dist.distributed.launch import GPU_ENV_VARS, destroy_distributed, init_distributed
from tokenformer_dist.distributed.net import free_port, job_port
from tokenformer_dist.planning import cadence

STEPS = 6
# constant LR: the run stopped at step 4 (--steps 4) follows the reference's schedule
SETS = {"train.save_every": 2, "train.grad_clip": 0.05, "train.warmup_frac": 0.0, "train.lr": 3e-3,
        "train.min_lr": 3e-3}


def _agents(runs: list[list[list[str]]], tmp: Path, timeout: float = 300) -> list[tuple[int, str]]:
    """Two torchrun agents (--nnodes 2, one rank each, c10d rendezvous): agent i runs the trainer argvs
    runs[i] one after another (tests/dist_scripts/train_multi.py). Returns each agent's (exit code, output)."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    for node, node_runs in enumerate(runs):
        log = tmp / f"node{node}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id",
               "tfd-views", "--max-restarts", "0", str(MULTI), json.dumps(node_runs)]
        procs.append(subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                                      env={**env(), "TOKENFORMER_DIST_FS_WAIT_S": "2"}, start_new_session=True))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- node {i}\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
        pytest.fail(f"the two agents did not finish within {timeout:.0f} s (a rank waiting in a collective)\n{tails}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs, strict=True)]


def _errors(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("error: ")]


@pytest.fixture(scope="module")
def views(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("views")
    ref, run = root / "reference", root / "run"
    # the uninterrupted reference, and the same run stopped at step 4 (checkpoints at steps 2 and 4)
    launch_runs(2, [train_argv(sample_data, ref, STEPS, tp=1, **SETS), train_argv(sample_data, run, 4, tp=1, **SETS)])

    # 1. node 1's --run-dir is a directory of its own: not what rank 0 uses
    alone0, alone1 = root / "alone0", root / "alone1"
    # 2. node 1 sees the run directory with a stale `latest` (step 2; rank 0 sees step 4): everything else is
    # rank 0's (symlinks), and what node 1 writes lands in its own checkpoints/ directory
    stale = root / "stale_view"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / ".shared_check").symlink_to(run / ".shared_check")
    for tag in ("step_00000002", "step_00000004"):
        (stale / "checkpoints" / tag).symlink_to(run / "checkpoints" / tag)
    (stale / "checkpoints" / "latest").write_text("step_00000002\n")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    # 3. node 1 sees the dataset without its val split
    no_val = root / "data_without_val"
    no_val.mkdir()
    (no_val / "train").symlink_to(sample_data / "train")
    manifest = json.loads((sample_data / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    val_run = root / "val_run"

    node0 = [train_argv(sample_data, alone0, 2, tp=1, **SETS),
             train_argv(sample_data, val_run, 2, tp=1, **{**SETS, "train.eval_every": 1}),
             train_argv(sample_data, run, STEPS, tp=1, **SETS)]
    node1 = [train_argv(sample_data, alone1, 2, tp=1, **SETS),
             train_argv(no_val, val_run, 2, tp=1, **{**SETS, "train.eval_every": 1}),
             train_argv(sample_data, stale, STEPS, tp=1, **SETS)]
    results = _agents([node0, node1], root)
    return {"root": root, "ref": ref, "run": run, "alone1": alone1, "no_val": no_val, "val_run": val_run,
            "results": results}


def test_run_dir_not_shared_stops_every_rank_with_one_line(views: dict) -> None:
    (rc0, log0), (rc1, log1) = views["results"]
    host = os.uname().nodename
    want = (f"error: rank 1 on node {host}: --run-dir {views['alone1']} is not the directory rank 0 (node {host}) "
            f"uses: the file .shared_check rank 0 wrote there is not visible here after 2 s; put the run directory "
            f"on a filesystem that every node mounts at the same path")
    assert _errors(log0)[:1] == [want] and _errors(log1)[:1] == [want], (log0[-3000:], log1[-3000:])
    assert not (views["root"] / "alone0" / "checkpoints").exists()  # stopped before anything was trained


def test_a_node_without_the_val_split_stops_every_rank_with_one_line(views: dict) -> None:
    (_, log0), (_, log1) = views["results"]
    want = (f"error: rank 1 on node {os.uname().nodename}: data.path {views['no_val']}: no val windows here, "
            f"but rank 0 validates on them")
    assert _errors(log0)[1:2] == [want] and _errors(log1)[1:2] == [want], (log0[-3000:], log1[-3000:])
    assert not (views["val_run"] / "checkpoints").exists()


def test_a_stale_latest_on_one_node_resumes_from_rank0s_checkpoint(views: dict) -> None:
    (rc0, log0), (rc1, log1) = views["results"]
    assert len(_errors(log0)) == len(_errors(log1)) == 2 and rc0 == rc1 != 0  # the two start-up stops above
    assert f"resumed from {views['run'] / 'checkpoints' / 'step_00000004'} at step 4" in log0, log0[-3000:]
    got, want = losses(views["run"]), losses(views["ref"])
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    assert got == want  # steps 5 and 6 too: both ranks went on from step 4


@pytest.fixture
def fresh_world(monkeypatch: pytest.MonkeyPatch):
    """A world of one process in this process (restored afterwards); yields the recorded group creations."""
    for k in (*GPU_ENV_VARS, "TOKENFORMER_DIST_ALLOW_CPU", "LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    created: list[tuple[str, str | None, torch.device | None]] = []
    real_init, real_new_group = dist.init_process_group, dist.new_group

    def record_init(backend: str | None = None, timeout: datetime.timedelta | None = None,
                    device_id: torch.device | None = None, **kw: object) -> None:
        created.append(("default", backend, device_id))
        real_init(backend="gloo", timeout=timeout, **kw)  # this CPU build has no NCCL: the group itself is gloo

    def record_new_group(*args: object, backend: str | None = None, **kw: object) -> object:
        created.append(("group", backend, None))
        return real_new_group(*args, backend=backend, **kw)

    monkeypatch.setattr(dist, "init_process_group", record_init)
    monkeypatch.setattr(dist, "new_group", record_new_group)
    try:
        yield created
    finally:
        destroy_distributed()
        comm.set_device(torch.device("cpu"))


def test_gpu_start_up_creates_nccl_groups_only(fresh_world: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's start-up (init_distributed) on a faked 2-GPU node as local rank 1: the default group is
    NCCL bound to cuda:1, megatron's groups inherit it (backend None), and no gloo group is made."""
    bound: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    info = init_distributed(tp=1)
    default, *groups = fresh_world
    assert default == ("default", "nccl", torch.device("cuda", 1)), default
    assert len(groups) >= 5 and {backend for _, backend, _ in groups} == {None}, groups
    assert bound == [torch.device("cuda", 1)] and info.device == comm.device() == torch.device("cuda", 1)


def test_cpu_start_up_is_gloo_without_extra_groups(fresh_world: list) -> None:
    info = init_distributed(tp=1)
    default, *groups = fresh_world
    assert default == ("default", "gloo", None) and {backend for _, backend, _ in groups} == {None}, fresh_world
    assert info.backend == "gloo" and info.device == torch.device("cpu")
    assert comm.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]  # the CPU path still works
    assert comm.broadcast_object({"tag": "step_00000004"}) == {"tag": "step_00000004"}
    assert comm.all_gather_object(3) == [3]


def test_job_port_lies_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {job_port(j) for j in range(0, 200_000, 7)}
    assert min(ports) >= 1024 and max(ports) < min(low, 32768), (min(ports), max(ports), low)
    assert len({job_port(j) for j in range(1000, 1100)}) == 100  # consecutive jobs on one node: distinct


def test_owt_124m_saves_at_most_2_percent_of_its_time() -> None:
    """owt_124m on the 8 x 8 H100 of slurm/pretrain_124m.sh: its save_every keeps a save's share of training
    time within cadence.MAX_SAVE_SHARE at the planner's step time, and saves at least every hour."""
    cfg = load_config(REPO / "configs" / "owt_124m.yaml")
    c = cadence.cadence(cfg, nodes=8, gpus_per_node=8, gpu="h100")
    assert c.share <= cadence.MAX_SAVE_SHARE, (c.save_every, c.share, c.save_every_for_share)
    assert cfg.train.save_every * c.step_s <= 3600, (cfg.train.save_every, c.step_s)
    out = subprocess.run([sys.executable, "-m", "tokenformer_dist.cadence", "--config", "configs/owt_124m.yaml",
                          "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100"], capture_output=True, text=True,
                         env=env(), cwd=REPO, timeout=120)
    assert out.returncode == 0 and f"save_every {cfg.train.save_every}: {c.share:.2%} of training time" in out.stdout


def test_cadence_cli_refuses_bad_input_with_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "tokenformer_dist.cadence", "--config", "configs/nope.yaml",
                          "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100"], capture_output=True, text=True,
                         env=env(), cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "configs/nope.yaml" in out.stderr


def test_trainer_prints_its_save_share(views: dict) -> None:
    (_, log0), _ = views["results"]
    assert "checkpoint every 2 steps: " in log0 and "of training time at the planner's" in log0, log0[-2000:]

