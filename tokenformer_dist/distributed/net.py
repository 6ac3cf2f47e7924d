"""Local networking for launchers: a free TCP port for a torch.distributed rendezvous (or any local server),
and the rendezvous port of a Slurm job (`job_port`: slurm/common.sh and launch.env_from_launcher use it)."""

from __future__ import annotations

import socket

# A Slurm job's rendezvous port: JOB_PORT_BASE + job id mod JOB_PORT_SPAN, i.e. 20000-31999. Below the
# kernel's ephemeral range (Linux default 32768-60999, /proc/sys/net/ipv4/ip_local_port_range), from which
# every outgoing connection on the node (NCCL's bootstrap sockets, other jobs' clients) takes its local
# port: a port inside it may already be held by such a connection when rank 0 binds the store, and the job
# fails with "address already in use". Two jobs on one node collide only if their ids differ by a multiple
# of JOB_PORT_SPAN; a requeued job keeps its id, so its port.
JOB_PORT_BASE = 20000
JOB_PORT_SPAN = 12000


def job_port(job_id: int) -> int:
    return JOB_PORT_BASE + job_id % JOB_PORT_SPAN


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it; another process may still take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

