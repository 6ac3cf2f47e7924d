"""A small English corpus that is already on every machine where the project is installed.

Documents are the docstrings of the Python modules of the standard library and of the installed
packages (one document per module, its docstrings joined by blank lines) and the .md/.rst/.txt
documentation files shipped in site-packages. Paths are visited in sorted order and the collection
stops at a byte budget, so the corpus is the same on every run with the same installed packages.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {
    "test",
    "tests",
    "testing",
    "__pycache__",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
}
SKIP_NAME_PARTS = ("license", "copying", "notice", "authors", "requirements", "entry_points", "top_level")
MAX_FILE_BYTES = 1 << 20


def _roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith((".dist-info", ".egg-info"))
        )
        for fn in sorted(filenames):
            yield Path(dirpath) / fn


def _docstrings(path: Path) -> str:
    try:
        src = path.read_bytes()
        if len(src) > 4 * MAX_FILE_BYTES:
            return ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(src)
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node, clean=True)
            if d and len(d) > 40:
                parts.append(d)
    return "\n\n".join(parts)


def iter_documents() -> Iterator[str]:
    for root in _roots():
        for path in _walk(root):
            name = path.name.lower()
            if name.endswith(".py"):
                text = _docstrings(path)
            elif name.endswith((".md", ".rst", ".txt")) and not any(s in name for s in SKIP_NAME_PARTS):
                try:
                    if path.stat().st_size > MAX_FILE_BYTES:
                        continue
                    text = path.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
            else:
                continue
            if len(text) > 200:
                yield text


def write_sample_text(dest: Path, budget_bytes: int) -> tuple[Path, int, int]:
    """Write the corpus as JSONL to dest/docs.jsonl (unchanged files are left as they are)."""
    dest.mkdir(parents=True, exist_ok=True)
    lines, total = [], 0
    for text in iter_documents():
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        lines.append(line)
        total += len(text.encode("utf-8"))
        if total >= budget_bytes:
            break
    data = "".join(lines).encode("utf-8")
    out = dest / "docs.jsonl"
    if not (out.exists() and out.read_bytes() == data):
        tmp = dest / ".docs.jsonl.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out)
    return out, len(lines), total
