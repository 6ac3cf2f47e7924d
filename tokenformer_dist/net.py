"""Local networking for launchers: a free TCP port for a torch.distributed rendezvous (or any local server)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it; another process may still take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
