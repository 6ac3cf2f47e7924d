"""What a test does when something it needs cannot be had (Slurm, a Ray cluster, shellcheck, the [hf] extra).

Outside CI it skips, saying why: a developer's machine may lack Slurm. Under CI (`CI=true`, which .ci/run
sets) it FAILS, with the log that says why: CI promises that coverage, and a skip would leave it green with
none. GPU tests are the one exception (tests/test_gpu.py skips without CUDA everywhere).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str, log: str = "", allow_module_level: bool = False) -> NoReturn:
    """Skip the calling test (outside CI) or fail it (under CI) because `reason`; `log` (e.g. the daemons'
    logs) is shown on failure and printed on a skip."""
    if in_ci():
        pytest.fail(f"{reason} -- under CI=true this coverage is required, not skipped"
                    + (f"\n{log}" if log else ""), pytrace=False)
    if log:
        print(f"\nSKIP: {reason}\n{log}")
    pytest.skip(reason, allow_module_level=allow_module_level)
