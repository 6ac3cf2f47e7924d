"""data_prep/build.py --ray-address on a real two-node Ray cluster on this machine: `ray start --head` and a
second `ray start --address`, each with its own temp dir, one CPU and a resource naming it, so the tasks
spread over both raylets. The output equals a local build byte for byte; Ray's own task records (GCS task
events) show tasks on both nodes; inputs that a node cannot see (its own mount namespace hides their
directory) are refused with one line; killing the worker node mid-build still ends in the same bytes.
A cluster that cannot start skips these tests (with the nodes' logs), or fails them under CI=true (tests/ci.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_prep.build import main
from tests.ci import unavailable
from tests.data_fixtures import dataset_files, make_docs, write_jsonl
from tests.dist import REPO, REPO_PYTHONPATH
from tokenformer_dist.distributed.net import free_port

RAY = Path(os.path.dirname(sys.executable)) / "ray"
VOCAB = 400
UNIT_DELAY_S = 0.3  # on the worker node only (its raylet's env): the kill lands mid-build


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO_PYTHONPATH,
            **extra}


def _stop(proc: subprocess.Popen, kill: bool = False) -> None:
    """End one `ray start --block` and every process it started (its own process group): SIGTERM, then
    SIGKILL after 3 s; `kill`: SIGKILL at once (a node dying)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10))[kill:]:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(5)
                return
            time.sleep(0.2)
    proc.wait(5)


class RayNodes:
    """`ray start --block` processes, each in its own process group, with its own temp dir."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.dirs: list[Path] = []  # removed by stop()
        self.temp: dict[str, Path] = {}  # each node's temp dir (its `ray start` output and Ray's logs)
        self.hidden: Path | None = None  # a directory the worker node cannot see

    def start(self, name: str, head: bool = False, wrap: list[str] | None = None, **env: str) -> None:
        temp = Path(tempfile.mkdtemp(prefix=f"tfd{name[:2]}", dir="/tmp"))  # short: Ray's socket paths
        self.dirs.append(temp)
        self.temp[name] = temp
        where = ["--head", "--port", str(self.port), "--include-dashboard=false"] if head else \
            ["--address", self.address]
        cmd = [str(RAY), "start", "--block", *where, "--num-cpus", "1", "--temp-dir", str(temp),
               "--object-store-memory", str(100 << 20), "--resources", json.dumps({f"tfd_{name}": 1}),
               "--disable-usage-stats"]
        log = (temp / "start.log").open("w")
        self.procs[name] = subprocess.Popen([*(wrap or []), *cmd], stdout=log, stderr=subprocess.STDOUT,
                                            env=_env(PYTHONUNBUFFERED="1", **env), start_new_session=True)
        # `ray start` prints this once its raylet has registered with the GCS
        self._wait(lambda: "Ray runtime started" in (temp / "start.log").read_text(errors="replace"),
                   f"`ray start` of node {name}", name)

    def _wait(self, ok, what: str, name: str | None, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            for n, p in self.procs.items():
                if p.poll() is not None and (name is None or n == name):
                    tail = (self.temp[n] / "start.log").read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"`ray start` for {n} exited {p.returncode}:\n{tail}")
            time.sleep(0.5)
        raise RuntimeError(f"no {what} after {timeout:.0f} s")

    def log_tail(self, lines: int = 30) -> str:
        """The end of every node's `ray start` output and raylet log (why a node did not come up)."""
        out = []
        for d in self.temp.values():
            for f in (d / "start.log", d / "session_latest/logs/raylet.err", d / "session_latest/logs/gcs_server.err"):
                if f.is_file():
                    out.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self, name: str | None = None, kill: bool = False) -> None:
        for n in [name] if name else list(self.procs)[::-1]:
            _stop(self.procs.pop(n), kill)
        if name is None:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)


def _driver(address: str, script: str) -> str:
    """Run `script` (which prints JSON) as a short Ray driver of the cluster; its stdout."""
    code = f"import json, ray\nray.init(address={address!r}, logging_level='ERROR')\n{script}\nray.shutdown()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def alive_nodes(address: str) -> dict[str, list[str]]:
    """{node id: its tfd_* resource names} of the alive nodes."""
    try:
        out = _driver(address, "print(json.dumps({n['NodeID']: [r for r in n['Resources'] if r.startswith('tfd_')]"
                               " for n in ray.nodes() if n['Alive']}))")
    except AssertionError:
        return {}
    return json.loads(out)


def tasks_per_node(address: str) -> dict[str, Counter]:
    """Ray's own records (the GCS's task events): {job id: Counter(node id -> process_unit tasks)}."""
    script = """
from collections import defaultdict
from ray.core.generated import gcs_pb2
acc = ray._private.state.state._connect_and_get_accessor()
where = {}
for raw in acc.get_task_events():
    e = gcs_pb2.TaskEvents.FromString(raw)
    key = (e.job_id.hex(), e.task_id.hex(), e.attempt_number)
    if e.task_info.name:
        where.setdefault(key, [None, None])[0] = e.task_info.name
    if e.state_updates.node_id:
        where.setdefault(key, [None, None])[1] = e.state_updates.node_id.hex()
out = defaultdict(dict)
for (job, _, _), (name, node) in where.items():
    if name == "process_unit" and node:
        out[job][node] = out[job].get(node, 0) + 1
print(json.dumps(out))
"""
    return {job: Counter(c) for job, c in json.loads(_driver(address, script)).items()}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayNodes]:
    """Head + worker. As root, the worker node runs in its own mount namespace in which `nodes.hidden` (a
    directory every other process sees) is an empty tmpfs: a node without part of the shared filesystem."""
    if not RAY.is_file():
        unavailable(f"no ray CLI at {RAY}")
    nodes = RayNodes()
    nodes.hidden = Path(tempfile.mkdtemp(prefix="tfd-hidden-", dir="/tmp"))
    nodes.dirs.append(nodes.hidden)
    wrap = None
    if shutil.which("unshare") is not None and os.geteuid() == 0:
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs tfd-private "{nodes.hidden}" && exec "$@"', "sh"]
    else:
        nodes.hidden = None
    try:
        nodes.start("head", head=True)
        nodes.start("worker", wrap=wrap, TFD_BUILD_UNIT_DELAY=str(UNIT_DELAY_S))
    except RuntimeError as e:
        log = f"{e}\n{nodes.log_tail()}"
        nodes.stop()
        unavailable(f"a two-node Ray cluster did not start: {str(e).splitlines()[0]}", log)
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("raycorpus")
    src = write_jsonl(d / "docs.jsonl", make_docs(240))
    args = ["--input", str(src), "--vocab-size", str(VOCAB), "--block-mb", "0.01", "--no-progress"]
    assert main([*args, "--output", str(d / "local"), "--workers", "0"]) == 0
    return {"dir": d, "args": args, "local": dataset_files(d / "local")}


def test_two_node_build_is_byte_identical_and_uses_both_nodes(cluster: RayNodes, corpus: dict,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "ray"
    assert main([*corpus["args"], "--output", str(out), "--ray-address", cluster.address]) == 0
    assert dataset_files(out) == corpus["local"]
    names = alive_nodes(cluster.address)
    jobs = tasks_per_node(cluster.address)
    assert len(jobs) == 1, jobs
    counts = next(iter(jobs.values()))
    units = json.loads((out / "manifest.json").read_text())["units"]
    assert sum(counts.values()) == units and units >= 8, (counts, units)
    assert {names[n][0] for n in counts} == {"tfd_head", "tfd_worker"}, (counts, names)


def test_a_node_that_cannot_see_the_inputs_is_refused(cluster: RayNodes, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Inputs in a directory that the worker node does not see (its mount namespace hides it): the build
    refuses to start, naming the node and the file, and leaves no manifest."""
    if cluster.hidden is None:
        unavailable("needs root and unshare(1) for a node with its own mount namespace")
    src = write_jsonl(cluster.hidden / "docs.jsonl", make_docs(40))
    rc = main(["--input", str(src), "--vocab-size", str(VOCAB), "--no-progress", "--output", str(tmp_path / "out"),
               "--ray-address", cluster.address])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err[-1].startswith("error: Ray node ") and err[-1].endswith(
        f"cannot see {src}: --ray-address needs the inputs on a filesystem shared by every "
        "node, at the same path (see docs/data.md)"), err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_killing_the_worker_node_mid_build(cluster: RayNodes, corpus: dict, tmp_path: Path) -> None:
    """SIGKILL to the worker node (`ray start` and its raylet, all at once) once some units are done: Ray retries the
    lost tasks on the head node and the build ends byte-identical to the local one; had the retries run
    out, the build exits 2 naming --resume, and --resume must then complete it byte-identically."""
    out = tmp_path / "ray"
    parts = out / ".build" / "parts"
    killed = threading.Event()

    def kill_when_started() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if parts.is_dir() and len(list(parts.glob("*.npz"))) >= 3:
                cluster.stop("worker", kill=True)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    rc = main([*corpus["args"], "--output", str(out), "--ray-address", cluster.address])
    killer.join(130)
    assert killed.is_set(), "the build finished before the worker node was killed"
    if rc != 0:  # retries exhausted: the one-line error says to resume, and resume finishes the job
        assert main([*corpus["args"], "--output", str(out), "--ray-address", cluster.address, "--resume"]) == 0
    assert dataset_files(out) == corpus["local"]
