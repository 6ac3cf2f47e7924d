"""The package's layout: imports between its role folders run one way (README, "A guided tour").

Every `import` / `from ... import` of a package module (also those inside functions) is read with `ast`; a
module may import its own folder and the layers below its own, never above. The layers, bottom first, are
the README's map; a new folder must be placed in LAYERS before it can be imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.dist import REPO

PACKAGE = REPO / "tokenformer_dist"
# bottom first; a name is a top-level module (config.py) or a folder (model/)
LAYERS: list[set[str]] = [
    {"cli", "atomic"},
    {"config", "data"},
    {"distributed"},
    {"model"},
    {"checkpoint"},
    {"inference", "planning"},
    {"training"},
    {"growth"},
    {"progressive"},
    {"train", "evaluate", "generate", "cadence", "expand_cli"},  # the `python -m` entry modules
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def role(module: str) -> str | None:
    """The top-level module or folder of `tokenformer_dist.<role>...`; None outside the package or for it."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tokenformer_dist" and len(parts) > 1 else None


def imported_roles(path: Path) -> list[tuple[int, str]]:
    """(line, role) of every package import in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, role(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tokenformer_dist":  # `from tokenformer_dist import x`: x is the role
                found += [(node.lineno, a.name) for a in node.names]
            else:
                found.append((node.lineno, role(node.module)))
    return [(line, r) for line, r in found if r is not None]


def upward_imports(package: Path) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel == Path("__init__.py"):
            continue
        own = rel.parts[0].removesuffix(".py")
        if own not in LAYER_OF:
            bad.append(f"{rel}: {own!r} is in no layer of tests/test_layout.py LAYERS")
            continue
        for line, target in imported_roles(path):
            if target != own and LAYER_OF.get(target, len(LAYERS)) >= LAYER_OF[own]:
                bad.append(f"{rel}:{line} imports {target} (layer {LAYER_OF.get(target)}), from layer "
                           f"{LAYER_OF[own]} ({own})")
    return bad


def test_imports_run_one_way_between_role_folders():
    assert upward_imports(PACKAGE) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """A copy of the package where the model imports the trainer is refused, naming file and line."""
    import shutil

    copy = tmp_path / "tokenformer_dist"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "model" / "init.py"
    target.write_text(target.read_text() + "\n\ndef _f():\n    from tokenformer_dist.training import trainer\n")
    bad = upward_imports(copy)
    assert len(bad) == 1 and bad[0].startswith("model/init.py:") and "imports training" in bad[0], bad


@pytest.mark.parametrize("entry", sorted(LAYERS[-1]))
def test_entry_modules_are_thin(entry):
    """`python -m tokenformer_dist.<entry>` keeps its path; the module only hands over to the code's home."""
    tree = ast.parse((PACKAGE / f"{entry}.py").read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) == 2 and isinstance(body[0], ast.ImportFrom) and isinstance(body[1], ast.If), entry
