"""Two "nodes" on one machine for torchrun: two agents (`--nnodes 2 --node-rank 0|1`, c10d rendezvous on
127.0.0.1), 2 processes each, TP 2 inside a node and DP 2 across. Their losses equal, bit for bit, those of
the same 4-process world under one agent; killing one agent (a node dying) ends the other within 60 s, and
the rerun resumes from the last checkpoint. Plus the rule that TP groups never straddle nodes, checked for
every (nodes, GPUs per node, TP) the shipped configs allow, against megatron-core's own rank layout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from megatron.core.parallel_state import RankGenerator

from tests.dist import REPO
from tests.dist_scripts.train_helpers import env, launch_runs, losses, train_argv, wait_for_step, worker_pids
from tokenformer_dist.distributed.launch import check_tp_within_node
from tokenformer_dist.distributed.net import free_port

STEPS = 40  # enough steps after the kill point that a loaded machine cannot finish before the kill
SETS = {"train.save_every": 5, "train.keep_last": 2, "train.grad_clip": 0.05}


def _agent(node_rank: int, endpoint: str, argv: list[str], log: Path) -> subprocess.Popen:
    """One torchrun agent = one node, in its own process group (so the whole node can be killed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
           "--rdzv-id", "tfd-multinode", "--max-restarts", "0", "-m", "tokenformer_dist.train", *argv]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(), cwd=REPO,
                            start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL one agent and its ranks (torchrun starts each rank in a session of its own)."""
    ranks = list(worker_pids(proc.pid).values())
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait(10)
        pytest.fail(f"agent --node-rank {proc.args[8]} did not exit within {timeout:.0f} s")
    return time.monotonic() - t0


def _two_agents(argv: list[str], tmp: Path, name: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    endpoint = f"127.0.0.1:{free_port()}"
    return (_agent(0, endpoint, argv, tmp / f"{name}-node0.log"), _agent(1, endpoint, argv, tmp / f"{name}-node1.log"))


def test_two_agents_match_one_agent_and_survive_a_dead_node(sample_data: Path, tmp_path: Path) -> None:
    ref = tmp_path / "one_agent"
    launch_runs(4, [train_argv(sample_data, ref, STEPS, tp=2, zero=1, **SETS)])

    run = tmp_path / "two_agents"
    argv = train_argv(sample_data, run, STEPS, tp=2, zero=1, **SETS)
    a0, a1 = _two_agents(argv, tmp_path, "first")
    try:
        wait_for_step(a0, run, 6)  # past the step-5 checkpoint
        _kill_group(a1)  # node 1 dies: its agent and both of its ranks
        took = _wait(a0, 90)
    finally:
        _kill_group(a0)
        _kill_group(a1)
    log0 = (tmp_path / "first-node0.log").read_text()
    assert a0.returncode != 0 and took < 60, (a0.returncode, took, log0[-3000:])
    done = max(losses(run))
    assert done < STEPS, "the run finished before node 1 was killed"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    resumed_at = int(latest.split("_")[1])
    assert 5 <= resumed_at <= done, (latest, done)

    a0, a1 = _two_agents(argv, tmp_path, "rerun")
    try:
        for agent in (a0, a1):
            _wait(agent, 240)
    finally:
        _kill_group(a0)
        _kill_group(a1)
    log0, log1 = ((tmp_path / f"rerun-node{i}.log").read_text() for i in (0, 1))
    assert a0.returncode == 0 and a1.returncode == 0, (log0[-3000:], log1[-3000:])
    assert f"resumed from {run / 'checkpoints' / latest}" in log0 + log1, log0[-3000:]
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    assert got == want  # bit for bit: 2 agents x 2 == 1 agent x 4, through a dead node and a resume


def _configured_tps() -> set[int]:
    tps = set()
    for f in (REPO / "configs").glob("*.yaml"):
        tp = (yaml.safe_load(f.read_text()) or {}).get("parallel", {}).get("tp")
        if tp:
            tps.add(int(tp))
    return tps


def test_tp_groups_never_straddle_nodes() -> None:
    """For every TP the configs use and every (nodes, GPUs per node) up to 8 x 8: what the check accepts
    puts every megatron TP group (its RankGenerator, the layout initialize_model_parallel builds) inside
    one node, and what it refuses would not."""
    tps = _configured_tps()
    assert tps >= {1, 2, 8}, tps
    checked = refused = 0
    for tp in sorted(tps | {4}):
        for nodes in range(1, 9):
            for per_node in (1, 2, 4, 8):
                world = nodes * per_node
                if world % tp:
                    continue  # refused earlier: TP must divide the world
                groups = RankGenerator(tp=tp, ep=1, dp=world // tp, pp=1, cp=1, order="tp-cp-ep-dp-pp").get_ranks("tp")
                inside = all(len({r // per_node for r in g}) == 1 for g in groups)
                try:
                    for rank in range(world):
                        check_tp_within_node(tp, world, per_node, node=rank // per_node, rank=rank)
                    accepted = True
                except ValueError:
                    accepted = False
                assert accepted == inside, (tp, nodes, per_node)
                checked += 1
                refused += not accepted
    assert checked > 50 and refused > 0


def test_tp_larger_than_a_node_is_refused_with_one_line(sample_data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The trainer's own start-up (init_distributed) as rank 0 of 2 torchrun nodes x 2: TP 4 is refused
    before any process group is created; and a rank that is not where node-by-node placement puts it."""
    from tokenformer_dist.training.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    rc = main(train_argv(sample_data, tmp_path / "run", 1, tp=4))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("error: parallel.tp (--tp) 4 does not fit the 2 ranks per node: a TP group must "
                               "stay inside one node; valid: a divisor of 2"), err
    with pytest.raises(ValueError, match=r"rank 2 runs on node 0, not node 1: ranks must be placed node by node"):
        check_tp_within_node(2, 4, 2, node=0, rank=2)
