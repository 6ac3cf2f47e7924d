"""Writes that readers never see half done: write under a temporary name next to the target, then rename.

A rename within one directory is atomic on POSIX file systems, so a crash leaves either the old target (or
none) and a temporary name starting with "." — never a partial file or directory under the real name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file path next to `path` (same suffix, so writers that infer the format from it work);
    renamed to `path` when the block ends, removed if it raises."""
    path = Path(path)
    # a fresh name, not mkstemp: the file is created by the writer, with the usual permissions (umask)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (parent directories created), fsynced before the rename."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, fsynced before the rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory next to `path` that becomes `path` when the block ends (removed if it raises).
    `path` must not exist: nothing is overwritten."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path}: output directory already exists; choose a new path (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
