"""Preemption: SIGTERM / SIGUSR1 (Slurm) set a flag; the ranks agree on it every few steps."""

from __future__ import annotations

import signal
from typing import Any

from tokenformer_dist.distributed import comm

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job should be requeued


class Preemption:
    """A signal handler plus a periodic agreement.

    The agreement is one all-reduce of a scalar and one host sync, so it runs only every `check_every`
    steps: a signal reaching any rank is acted on (checkpoint, exit 75) at the first multiple of
    `check_every` after it, i.e. after at most `check_every` more steps.
    """

    def __init__(self, check_every: int) -> None:
        self.flag = False
        self.check_every = check_every
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.flag = True

    def should_stop(self, step: int) -> bool:
        """Collective on `check_every` steps (every rank must call it with the same step)."""
        if step % self.check_every:
            return False
        return bool(comm.any_rank(self.flag).item())
