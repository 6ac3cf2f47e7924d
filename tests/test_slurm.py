"""The Slurm scripts on a real two-node Slurm on this machine (tests/slurm_cluster.py: two `slurmd -N`, each
node with 2 CPUs; a second such cluster whose nodes have 2 emulated GPUs each): a tiny job through
`sbatch --nodes=2 slurm/pretrain_124m.sh` (2 CPU tasks per node, TP 2 inside a node, DP 2 across; its
rendezvous port and time-limit lead from the project's rules), the same job requeued twice (by `scontrol
requeue`, and by its own script on the time-limit signal) resuming from its checkpoint each time with the
same losses, the script's own time-limit timer and its GPU binding (with a stand-in for the trainer,
tests/dist_scripts/slurm_probe.py), slurm/progressive.sh chaining two growths and two training stages on
two nodes, and Slurm's host-list expansion against `scontrol show hostnames` (which needs only a slurm.conf,
no daemons). Skipped (reason and daemon logs printed) where Slurm is not installed or its daemons cannot
start; under CI=true that fails instead (tests/ci.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ci import unavailable
from tests.slurm_cluster import SlurmCluster
from tokenformer_dist.checkpoint.engine import resolve_checkpoint
from tokenformer_dist.config import load_config
from tokenformer_dist.distributed.launch import expand_hostlist
from tokenformer_dist.distributed.net import job_port
from tokenformer_dist.planning import cadence

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sh"))
# one node, two CPU ranks: how the multi-node GPU scripts are run here (--time > the 10-min USR1 lead)
CPU_FLAGS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30"]
# two nodes, two CPU ranks each: TP 2 inside a node, DP 2 across the nodes
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30"]
TINY = ["--set", "train.log_every=1", "--set", "train.eval_every=100000", "--set", "train.eval_batches=1",
        "--set", "train.save_every=100000"]


def test_scripts_parse_and_pass_shellcheck() -> None:
    assert {p.name for p in SCRIPTS} >= {"common.sh", "expand.sh", "progressive.sh", "pretrain_124m.sh",
                                          "pretrain_354m.sh", "pretrain_757m.sh", "pretrain_1p4b.sh"}
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
    if subprocess.run(["which", "shellcheck"], capture_output=True).returncode != 0:
        unavailable("shellcheck not installed (apt-get install shellcheck)")
    # from the repository root, where the scripts' `# shellcheck source=slurm/common.sh` resolves
    proc = subprocess.run(["shellcheck", "-x", *[str(s.relative_to(REPO)) for s in SCRIPTS]],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    # 2 CPUs per node: 1 per rank, so 4 ranks do not oversubscribe 2 real cores with OMP threads
    c = SlurmCluster(cpus=2, nodes=2).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, cluster: SlurmCluster) -> Path:
    """A small sample dataset (vocab 8192, what configs/tiny.yaml expects), built once for this module."""
    out = tmp_path_factory.mktemp("slurm-data") / "data"
    proc = subprocess.run([sys.executable, "data_prep/build.py", "--output", str(out), "--sample-mb", "1",
                           "--workers", "0", "--no-progress"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, f"data_prep/build.py failed:\n{proc.stderr[-3000:]}"
    return out


def _submit_tiny(cluster: SlurmCluster, tmp: Path, data: Path, steps: int) -> tuple[int, Path, Path]:
    """`sbatch --nodes=2 slurm/pretrain_124m.sh` with the tiny config at TP 2 (CPU settings via the env)."""
    run_dir, out = tmp / "run", tmp / "job.out"
    job = cluster.submit(SLURM_DIR / "pretrain_124m.sh", ["--steps", str(steps), *TINY],
                         [*TWO_NODES, f"--output={out}"],
                         env={"CONFIG": "configs/tiny.yaml", "TP": "2", "DATA": str(data),
                              "RUN_DIR": str(run_dir), "PYTHON": sys.executable},
                         cwd=REPO)
    return job, run_dir, out


def _metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [r for r in (json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()) if "loss" in r]


def _wait_step(run_dir: Path, step: int, timeout: float, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in _metrics(run_dir)):
            return
        time.sleep(0.2)
    tail = out.read_text()[-4000:] if out.is_file() else "(no output)"
    raise AssertionError(f"the trainer logged no step >= {step} within {timeout:.0f} s\n{tail}")


def _check_finished(run_dir: Path, steps: int) -> list[dict]:
    tag = f"step_{steps:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag
    assert json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())["step"] == steps
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    return records


STEPS = 30  # ~0.2-0.3 s a step idle: room to interrupt a running job twice (a signal acts within a few steps)


@pytest.fixture(scope="module")
def tiny_run(cluster: SlurmCluster, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted reference job: tiny config, TP 2, two nodes x 2 CPU tasks, via pretrain_124m.sh."""
    tmp = tmp_path_factory.mktemp("slurm-tiny")
    job, run_dir, out = _submit_tiny(cluster, tmp, data_dir, STEPS)
    info = cluster.wait_job(job, ["COMPLETED"], timeout=180, output=out)
    return {"info": info, "run_dir": run_dir, "out": out, "job": job}


def test_pretrain_script_runs_on_two_nodes_with_two_tasks_each(cluster: SlurmCluster, tiny_run: dict) -> None:
    info, log = tiny_run["info"], tiny_run["out"].read_text()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    assert info["NodeList"] == "tfd[1-2]" and info["NumNodes"] == "2", info
    # the rendezvous is the first node's NodeAddr at the job's port (net.job_port: below the ephemeral
    # range); each rank gets 2 CPUs / 2 tasks = 1 OMP thread
    port = job_port(tiny_run["job"])
    assert f"4 ranks (2 node(s) x 2, GPUs/node 0), rendezvous 127.0.0.1:{port}\n" in log and "--tp 2" in log, log
    assert "1 CPU(s) and 1 OMP thread(s) per rank" in log, log
    # the time-limit warning, armed with the lead planning/cadence.py derives from the config (2 nodes x 2 CPU ranks)
    lead = math.ceil(cadence.cadence(load_config(REPO / "configs" / "tiny.yaml"), 2, 2, "cpu").lead_s)
    assert re.search(rf"time-limit warning \(SIGUSR1\) in \d+ s, {lead} s before the limit", log), (lead, log)
    # Slurm's own records: each node's slurmd launched the trainer step (srun --ntasks-per-node=2; every
    # rank checks at start-up that it runs on node rank // 2, see launch.check_tp_within_node)
    for node in ("tfd1", "tfd2"):
        assert cluster.launched_step(node, f"{tiny_run['job']}.0"), cluster.log_tail()
    records = _check_finished(tiny_run["run_dir"], STEPS)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it trained


def test_requeued_job_resumes_from_its_checkpoint(cluster: SlurmCluster, data_dir: Path, tiny_run: dict,
                                                  tmp_path: Path) -> None:
    """Two interruptions of one job: `scontrol requeue` (Slurm sends SIGCONT + SIGTERM to every process of
    the job), then SIGUSR1 to the batch shell only (what the script's time-limit timer sends before the limit;
    the script forwards it to the ranks and requeues the job itself). Each time the trainer checkpoints,
    exits 75, and the restarted job resumes from that checkpoint: the metrics run 1..steps once, with the
    losses of the uninterrupted job."""
    steps = STEPS
    job, run_dir, out = _submit_tiny(cluster, tmp_path, data_dir, steps)

    # interruption 1: an operator's / the scheduler's requeue
    _wait_step(run_dir, 2, timeout=120, out=out)
    subprocess.run(["scontrol", "requeue", str(job)], env=cluster.env, check=True, timeout=30)
    # interruption 2: the time-limit warning, to the batch shell only
    cluster.wait_job(job, ["RUNNING"], timeout=120, restarts=1, output=out)
    _wait_restart_progress(run_dir, out, restarts=1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster.env, check=True, timeout=30)

    info = cluster.wait_job(job, ["COMPLETED"], timeout=240, restarts=2, output=out)
    assert info["ExitCode"] == "0:0", info
    log = out.read_text()
    saved = [int(s) for s in re.findall(r"preempted: checkpoint saved at step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resuming from .*/checkpoints/step_(\d+)", log)]
    assert len(saved) == 2 and saved == resumed and 0 < saved[0] < saved[1] < steps, log
    assert "SIGTERM: waiting for the trainer" in log and "SIGUSR1: time limit near" in log, log
    assert log.count("trainer exited with status 75") == 2 and "requeueing job" in log, log
    assert log.count("restart 0:") == 1 and log.count("restart 1:") == 1 and log.count("restart 2:") == 1, log
    resumed_losses = [r["loss"] for r in _check_finished(run_dir, steps)]
    reference = [r["loss"] for r in _metrics(tiny_run["run_dir"])]
    assert resumed_losses == pytest.approx(reference, rel=1e-5, abs=1e-6)


def _wait_restart_progress(run_dir: Path, out: Path, restarts: int) -> None:
    """Wait until the restarted trainer has logged a step past the checkpoint it resumed from."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.findall(r"resuming from .*/checkpoints/step_(\d+)", out.read_text() if out.is_file() else "")
        if len(m) >= restarts:
            _wait_step(run_dir, int(m[-1]) + 2, timeout=max(1.0, deadline - time.monotonic()), out=out)
            return
        time.sleep(0.2)
    raise AssertionError(f"job did not restart {restarts} time(s) within 120 s\n{out.read_text()[-4000:]}")


def _probe_python(tmp: Path, mode: str) -> Path:
    """A PYTHON for slurm/common.sh that runs tests/dist_scripts/slurm_probe.py MODE where the script starts
    the trainer, and the real interpreter for everything else (the port and lead look-ups)."""
    wrapper = tmp / "python"
    wrapper.write_text(f"""#!/bin/bash
for a in "$@"; do
  [[ "$a" != tokenformer_dist.train ]] || exec {sys.executable} {REPO}/tests/dist_scripts/slurm_probe.py {mode}
done
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture
def gpu_cluster(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """Two nodes with 2 emulated GPUs each (its own cluster: the scripts' `--exclusive` would hand the GPUs to
    the CPU jobs of `cluster` too, and the trainer rightly refuses GPUs it cannot use)."""
    c = SlurmCluster(cpus=2, nodes=2, gpus=2).start()
    try:
        yield c
    finally:
        c.stop()


def test_every_rank_gets_its_own_gpu(gpu_cluster: SlurmCluster, tmp_path: Path) -> None:
    """GPU binding on two nodes x 2 emulated GPUs: pretrain_124m.sh's srun (--gpus-per-node, Slurm's default
    binding: every task sees the step's GPUs of its node) and, for a cluster that binds per task, `srun
    --gpus-per-task=1` (each task sees one). Either way the trainer's rule (cuda:LOCAL_RANK mod visible
    devices, with LOCAL_RANK from SLURM_LOCALID) gives the ranks of a node distinct GPUs, all of them."""
    cluster = gpu_cluster
    out = tmp_path / "job.out"
    job = cluster.submit(SLURM_DIR / "pretrain_124m.sh", [],
                         ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=30", f"--output={out}"],
                         env={"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(tmp_path / "run"),
                              "PYTHON": str(_probe_python(tmp_path, "gpus"))}, cwd=REPO)
    cluster.wait_job(job, ["COMPLETED"], timeout=120, output=out)
    per_task = tmp_path / "per_task.sh"
    per_task.write_text(f"#!/bin/bash\nsrun --gpus-per-task=1 {sys.executable} {REPO}/tests/dist_scripts/"
                        "slurm_probe.py gpus\n")
    out2 = tmp_path / "per_task.out"
    job2 = cluster.submit(per_task, [], ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=5",
                                         f"--output={out2}"], env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    cluster.wait_job(job2, ["COMPLETED"], timeout=120, output=out2)
    for f, visible in ((out, 2), (out2, 1)):
        probes = [json.loads(ln) for ln in f.read_text().splitlines() if ln.startswith("{")]
        assert sorted(p["rank"] for p in probes) == [0, 1, 2, 3], f.read_text()
        for node in ("tfd1", "tfd2"):
            mine = [p for p in probes if p["node"] == node]
            assert all(p["local_rank"] == p["slurm_localid"] and len(p["visible"]) == visible for p in mine), mine
            assert sorted(p["gpu"] for p in mine) == ["0", "1"], mine  # distinct, and all of the node's


def test_time_limit_warning_checkpoints_and_requeues(cluster: SlurmCluster, tmp_path: Path) -> None:
    """The script's own warning: SIGNAL_LEAD (45 s) before the job's time limit (1 min) it sends itself
    SIGUSR1, passes it to the ranks (here stand-ins that exit 75 at once, as the trainer does after its
    checkpoint) and requeues the job. The trainer's side of this is test_requeued_job_resumes_from_its_checkpoint."""
    out = tmp_path / "job.out"
    job = cluster.submit(SLURM_DIR / "pretrain_124m.sh", [], [*CPU_FLAGS[:3], "--time=1", f"--output={out}"],
                         env={"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(tmp_path / "run"), "SIGNAL_LEAD": "45",
                              "PYTHON": str(_probe_python(tmp_path, "usr1"))}, cwd=REPO)
    try:
        cluster.wait_job(job, ["RUNNING", "PENDING"], timeout=120, restarts=1, output=out)
    finally:
        subprocess.run(["scancel", str(job)], env=cluster.env, timeout=30)
    log = out.read_text()
    assert re.search(r"time-limit warning \(SIGUSR1\) in \d+ s, 45 s before the limit", log), log
    assert "SIGUSR1: time limit near; asking the trainer to checkpoint" in log, log
    assert log.count("got SIGUSR1") >= 2 and "trainer exited with status 75" in log, log  # both ranks
    assert f"requeueing job {job}" in log, log


@pytest.mark.parametrize(("env", "error"), [
    ({"CONFIG": "configs/nope.yaml"},
     "slurm: error: CONFIG=configs/nope.yaml: no such config file "
     "(valid: a YAML file such as configs/tiny.yaml)"),
    ({"NODES": "2"}, "slurm: error: NODES=2 but the job has 1 node(s); submit with sbatch --nodes=2"),
    ({"TP": "3"}, "slurm: error: TP=3 does not divide the 2 ranks; valid: a divisor of it"),
], ids=["config", "nodes", "tp"])
def test_bad_settings_fail_the_job_with_one_line(cluster: SlurmCluster, tmp_path: Path, env: dict,
                                                  error: str) -> None:
    out = tmp_path / "job.out"
    job = cluster.submit(SLURM_DIR / "pretrain_124m.sh", [], [*CPU_FLAGS, f"--output={out}"],
                         env={"PYTHON": sys.executable, "RUN_DIR": str(tmp_path / "run"), **env}, cwd=REPO)
    info = cluster.wait_job(job, ["FAILED"], timeout=60, output=out)
    assert info["ExitCode"] == "2:0" and out.read_text().strip() == error, out.read_text()


def _progressive(cluster: SlurmCluster, env: dict[str, str], *args: str) -> dict[str, int]:
    """Run slurm/progressive.sh; returns {"expand->354m": id, "354m": id, ...} from what it prints."""
    proc = subprocess.run([str(SLURM_DIR / "progressive.sh"), *args], capture_output=True, text=True,
                          env={**cluster.env, **env}, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = {}
    for m in re.finditer(r"^(expand -> |stage )(\w+): job (\d+)", proc.stdout, re.M):
        jobs[("expand->" if m[1].startswith("expand") else "") + m[2]] = int(m[3])
    return jobs


def test_progressive_submits_the_ladder_as_an_afterok_chain(cluster: SlurmCluster, tmp_path: Path) -> None:
    """All four OWT stages and the three expansions, submitted held (nothing runs): 7 jobs, each depending
    on the one before it with afterok, each stage with its run dir, config and INIT_FROM."""
    env = {"RUN_ROOT": str(tmp_path / "runs"), "SBATCH_ARGS": f"--hold --output={tmp_path}/%x-%j.out",
           "NODES": "1", "GPUS_PER_NODE": "0", "TASKS_PER_NODE": "2",  # this cluster has no GPUs
           "EXPAND_SBATCH_ARGS": "--cpus-per-task=2"}  # its nodes have 2 CPUs
    jobs = _progressive(cluster, env)
    order = ["124m", "expand->354m", "354m", "expand->757m", "757m", "expand->1p4b", "1p4b"]
    try:
        assert list(jobs) == order, jobs
        for prev, name in zip(order, order[1:], strict=False):
            info = cluster.job(jobs[name])
            assert info["Dependency"].startswith(f"afterok:{jobs[prev]}"), (name, info["Dependency"])
        assert cluster.job(jobs["124m"])["Dependency"] == "(null)"
        assert cluster.job(jobs["1p4b"])["Command"].endswith("slurm/pretrain_1p4b.sh")
        assert cluster.job(jobs["expand->757m"])["Command"].endswith("slurm/expand.sh")
    finally:
        subprocess.run(["scancel", *map(str, jobs.values())], env=cluster.env, timeout=30)


def test_progressive_chain_grows_and_trains_two_stages(cluster: SlurmCluster, data_dir: Path, tiny_run: dict,
                                                       tmp_path: Path) -> None:
    """Two real steps of the ladder on the tiny model: the finished two-node tiny run plays stage 124m; the
    chain runs expand -> 354m -> expand -> 757m (tools/expand_tokens.py: more tokens, exact init; each stage
    with INIT_FROM on two nodes). Each stage starts from the one before: each growth's manifest names the
    previous stage's final checkpoint, and each stage's first loss is far below a fresh model's."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "owt_124m").symlink_to(tiny_run["run_dir"])
    env = {"RUN_ROOT": str(runs), "FROM_STAGE": "354m", "TO_STAGE": "757m", "DATA": str(data_dir),
           "PYTHON": sys.executable, "NODES": "2", "GPUS_PER_NODE": "0", "TASKS_PER_NODE": "2", "TIME": "30",
           "SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out", "EXPAND_ARGS": "--no-progress",
           "EXPAND_SBATCH_ARGS": "--cpus-per-task=2"}
    tokens = {"354m": 96, "757m": 128}
    for stage, qkv in tokens.items():
        grown = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        grown["model"].update(qkv_tokens=qkv, proj_tokens=qkv, ffn_tokens=4 * qkv)
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(grown))
        env[f"CONFIG_{stage.upper()}"] = str(tmp_path / f"{stage}.yaml")
    steps = 3
    jobs = _progressive(cluster, env, "--steps", str(steps), *TINY)
    assert list(jobs) == ["expand->354m", "354m", "expand->757m", "757m"], jobs
    assert cluster.job(jobs["757m"])["Dependency"].startswith(f"afterok:{jobs['expand->757m']}")
    out = {stage: tmp_path / f"tf-{stage}-{jobs[stage]}.out" for stage in tokens}
    info = cluster.wait_job(jobs["757m"], ["COMPLETED"], timeout=300, output=out["757m"])
    assert info["ExitCode"] == "0:0", info
    fresh_first = _metrics(tiny_run["run_dir"])[0]["loss"]
    previous, old_qkv = Path(tiny_run["run_dir"]).resolve(), 64
    for stage, qkv in tokens.items():
        init = runs / f"owt_{stage}.init"
        manifest = json.loads((init / "manifest.json").read_text())
        assert Path(manifest["source"]) == resolve_checkpoint(previous), manifest
        assert (manifest["old_tokens"]["qkv"], manifest["new_tokens"]["qkv"], manifest["init"]) == (old_qkv, qkv,
                                                                                                   "exact")
        log = out[stage].read_text()
        assert f"--init-from {init}" in log and "4 ranks (2 node(s) x 2, GPUs/node 0)" in log
        records = _check_finished(runs / f"owt_{stage}", steps)
        assert records[0]["loss"] < fresh_first - 1.0, (stage, records[0]["loss"], fresh_first)
        previous, old_qkv = (runs / f"owt_{stage}").resolve(), qkv


HOSTLISTS = ["node[01-04]", "a[1-2],b3", "gpu-[7-9,10-11]", "rack[1-2]-n[08-10]", "x1,y[001-002],z",
             "tfd[1-2]"]


def test_hostlist_expansion_matches_scontrol(tmp_path: Path) -> None:
    """tokenformer_dist.distributed.launch.expand_hostlist (used where scontrol is absent) against Slurm's own
    `scontrol show hostnames`, on the lists users' jobs get (zero padding, several groups, mixed). scontrol
    needs a slurm.conf to read, not a running cluster."""
    if shutil.which("scontrol") is None:
        unavailable("Slurm's scontrol not installed (apt-get install slurm-wlm)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=tfdhostlist\nSlurmctldHost=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for hostlist in HOSTLISTS:
        real = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                              env=env, check=True, timeout=30).stdout.split()
        assert expand_hostlist(hostlist) == real, hostlist
    assert expand_hostlist("node[01-04]")[0] == "node01"


def test_first_slurm_host_without_scontrol(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a node without Slurm's client tools the trainer still finds the first host of `node[01-04]`
    (the bug: it used to answer "node")."""
    from tokenformer_dist.distributed.launch import _first_slurm_host

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    for hostlist, first in (("node[01-04]", "node01"), ("a[1-2],b3", "a1"), ("gpu-[7-9]", "gpu-7"), ("x1", "x1")):
        monkeypatch.setenv("SLURM_JOB_NODELIST", hostlist)
        assert _first_slurm_host() == first, hostlist
