"""A real Slurm cluster for tests: munged + slurmctld + one slurmd per node, started as root, config in a temp dir.

Several nodes on one machine: one `slurmd -N <name>` per node, each NodeName on its own port and spool dir.
That needs a Slurm built with --enable-multiple-slurmd; Debian's slurm-wlm 22.05 is (checked when the
second node registers: without it slurmctld refuses the config with "Duplicated NodeHostName").
Used by tests/test_slurm.py. `SlurmCluster.start()` skips the calling test when Slurm is not installed (or
we are not root, or the daemons do not come up: the reason and the daemons' logs are printed), and fails it
instead under CI=true (tests/ci.py); every wait is bounded, since a job that cannot fit stays PENDING
forever. Daemons it started are stopped by `stop()`; a munged that was already running is left alone.
Set TFD_SLURM_CONF to the slurm.conf of a cluster that is already running to use it instead.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from tests.ci import unavailable
from tokenformer_dist.distributed.net import free_port

MUNGE_SOCKET_DIR = Path("/run/munge")
REQUIRED = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
# Slurm holds a requeued job for cred_expire seconds (default 120) before it may start again; the test
# cluster shortens that so a requeue test takes seconds, not minutes (see docs/slurm.md).
CRED_EXPIRE_S = 5
KILL_WAIT_S = 60  # SIGTERM -> SIGKILL grace: time the trainer has to write its checkpoint
FAIL_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 30, check: bool = True,
         cwd: str | Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {why}")
    return proc.stdout


def _munge_works() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
        return dec.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _stop_pid(pid: int, timeout: float = 15) -> None:
    """SIGTERM one daemon we started, SIGKILL it if it is still there after `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class SlurmCluster:
    """`nodes` nodes tfd1..tfdN on this machine (`hostname -s`), `cpus` declared CPUs each, one default
    partition `debug`. `gpus` > 0 declares that many GPUs per node as generic resources (`Gres=gpu:N`) whose
    device files are links to /dev/null in the cluster's temp dir (slurmd wants character devices): Slurm
    allocates and binds them, and sets CUDA_VISIBLE_DEVICES, as it would for real GPUs (no process here can
    use them)."""

    def __init__(self, cpus: int = 4, nodes: int = 1, gpus: int = 0) -> None:
        self.cpus = cpus
        self.gpus = gpus
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [f"tfd{i}" for i in range(1, nodes + 1)]
        self.root: Path | None = None
        self.conf: Path | None = None
        self.env: dict[str, str] = dict(os.environ)
        self._pidfiles: list[Path] = []
        self._munged_pidfile: Path | None = None

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        missing = [b for b in REQUIRED if shutil.which(b) is None]
        if missing:
            unavailable(f"Slurm not installed (no {', '.join(missing)}; apt-get install slurm-wlm munge)")
        external = os.environ.get("TFD_SLURM_CONF")
        if external:
            self.conf = Path(external)
            self.env["SLURM_CONF"] = str(self.conf)
            self.wait_node_idle()
            return self
        if os.geteuid() != 0:
            unavailable("the one-node Slurm test cluster needs root (slurmd runs jobs as their user)")
        self.root = Path(tempfile.mkdtemp(prefix="tfd-slurm-"))
        self.conf = self.root / "slurm.conf"
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        self._write_conf()
        self.env["SLURM_CONF"] = str(self.conf)
        # all daemonize; their pid files name them
        try:
            self._start_munged()
            self._pidfiles.append(self.root / "slurmctld.pid")
            _run(["slurmctld", "-f", str(self.conf)], self.env)
            for node in self.nodes:
                (self.root / "spool" / node).mkdir()
                self._pidfiles.append(self.root / f"slurmd-{node}.pid")
                _run(["slurmd", "-f", str(self.conf), "-N", node], self.env)
            self.wait_node_idle()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            why = f"{len(self.nodes)}-node Slurm did not start: {str(e).splitlines()[0]}"
            log = str(e) if "\n--- " in str(e) else f"{e}\n{self.log_tail(30)}"  # the daemons' logs, once
            self.stop()
            unavailable(why, log)
        return self

    def _write_conf(self) -> None:
        assert self.root is not None and self.conf is not None
        r = self.root
        # a random first job id: MASTER_PORT derives from it, so two concurrent test sessions do not collide;
        # from 12000, where net.job_port (id mod 12000) and a plain `id mod 20000` rule give different ports
        first_job = random.randint(12000, 19000)
        # one slurmd per node, all on this machine: each its own port (NodeHostname: where it may run)
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} "
                           f"CPUs={self.cpus}{gres} State=UNKNOWN" for n in self.nodes)
        if self.gpus:
            (r / "dev").mkdir()
            for i in range(self.gpus):
                (r / "dev" / f"nvidia{i}").symlink_to("/dev/null")
            (r / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={r}/dev/nvidia[0-{self.gpus - 1}]\n")
        self.conf.write_text(f"""# written by tests/slurm_cluster.py
ClusterName=tfdtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
AuthType=auth/munge
AuthInfo=cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
{"GresTypes=gpu" if self.gpus else ""}
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
KillWait={KILL_WAIT_S}
FirstJobId={first_job}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munged(self) -> None:
        if _munge_works():
            return  # a running munged (ours from an earlier session, or the system's) is shared
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        # munged refuses to run as root; the key from the package is owned by user munge
        _run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], self.env)
        self._munged_pidfile = MUNGE_SOCKET_DIR / "munged.pid"
        deadline = time.monotonic() + 15
        while not _munge_works():
            if time.monotonic() > deadline:
                raise RuntimeError("munged started but `munge -n | unmunge` still fails after 15 s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel our jobs and stop the daemons this object started (never anything else)."""
        if self.root is None:
            return
        try:
            _run(["scancel", "--full", "--user", "root"], self.env, check=False)
            self.wait_no_jobs(timeout=KILL_WAIT_S + 30)
        except (OSError, subprocess.SubprocessError, RuntimeError):
            pass
        for pidfile in reversed(self._pidfiles):
            if pidfile.is_file():
                _stop_pid(int(pidfile.read_text().split()[0]))
        if self._munged_pidfile and self._munged_pidfile.is_file():
            _stop_pid(int(self._munged_pidfile.read_text().split()[0]))
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    # --- queries ----------------------------------------------------------------------------------------
    def log_tail(self, n: int = 40) -> str:
        if self.root is None:
            return ""
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def launched_step(self, node: str, step: str) -> bool:
        """Whether the node's slurmd launched tasks of job step `step` (e.g. "1234.0"), from its own log."""
        assert self.root is not None
        log = (self.root / "log" / f"slurmd-{node}.log").read_text(errors="replace")
        return f"launch task StepId={step} request" in log

    def wait_node_idle(self, timeout: float = 60) -> None:
        """Until every node is idle (all registered)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True,
                                  env=self.env, timeout=30)
            state = proc.stdout.strip() or proc.stderr.strip()
            states = state.split()
            if proc.returncode == 0 and states and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s (sinfo: {state!r})\n{self.log_tail()}")

    def wait_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _run(["squeue", "-h", "-o", "%i"], self.env).strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs still queued after {timeout:.0f} s")
            time.sleep(0.5)

    def submit(self, script: str | Path, args: Iterable[str] = (), sbatch_flags: Iterable[str] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        """sbatch `script` from `cwd` (the job's submit dir), our environment plus `env`; returns its id."""
        out = _run(["sbatch", "--parsable", *sbatch_flags, str(script), *args], {**self.env, **(env or {})},
                   cwd=cwd, timeout=120)  # sbatch waits on slurmctld, which a loaded machine can starve
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...); {} once it is gone."""
        try:
            proc = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                                  env=self.env, timeout=30)
        except subprocess.TimeoutExpired:  # slurmctld starved of CPU: unknown for now, the caller polls on
            return {"JobState": "UNKNOWN"}
        if proc.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for item in proc.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: int, states: Iterable[str], timeout: float, restarts: int | None = None,
                 fail_states: Iterable[str] = FAIL_STATES, output: Path | None = None) -> dict[str, str]:
        """Poll until the job's state is in `states` (and it has been requeued `restarts` times, if given);
        raise, with the job's output, on a fail state or a timeout."""
        wanted, bad = set(states), set(fail_states) - set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in wanted and (restarts is None or info.get("Restarts") == str(restarts)):
                return info
            if state in bad or state == "COMPLETED":  # a final state, but not the one wanted
                break
            time.sleep(0.5)
        tail = output.read_text(errors="replace")[-6000:] if output and output.is_file() else "(no output)"
        raise AssertionError(f"job {job_id}: state {info.get('JobState')!r} (reason {info.get('Reason')}, "
                             f"exit {info.get('ExitCode')}, restarts {info.get('Restarts')}), wanted "
                             f"{sorted(wanted)} (restarts {restarts}) within {timeout:.0f} s\n"
                             f"--- job output\n{tail}")
