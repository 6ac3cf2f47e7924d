"""Every command line: a user's mistake is ONE line on stderr (`error: ...`), exit 2, and nothing written.

Each entry point — every `python -m tokenformer_dist.X` module with a __main__ block, every tools/ script, and
data_prep/build.py — runs with representative bad inputs: a missing path, the wrong kind of directory, a TP
degree that does not divide, a bad flag value. `test_every_entry_point_has_cases` fails when a CLI appears
without cases here.

Speed: a fresh interpreter per case would import torch (and for some, megatron-core and DeepSpeed) ~50 times.
Instead one plain subprocess per entry point (this file run as a script) runs that entry's cases one after
another, each exactly as `python -m X` / `python tools/x.py` runs it (runpy with run_name="__main__" and its
argv, in an empty working directory), with the process's stderr file descriptor captured per case (so C-level
output and tracebacks count), warnings shown afresh per case, and the watched directories compared before/after.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

from tests.dist import REPO, REPO_PYTHONPATH

TINY = REPO / "configs" / "tiny.yaml"
NODES = ["--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100"]

# entry point -> [(argv, a piece of the one error line)]; {name} is a path under the fixture's directory
CASES: dict[str, list[tuple[list[str], str]]] = {
    "-m tokenformer_dist.config": [
        (["{missing}/c.yaml"], "no such config file"),
        (["{empty}"], "config"),
        (["{tiny}", "--tp", "3"], "not divisible by parallel.tp=3"),
        (["{tiny}", "--tp", "x"], "--tp"),
        (["{tiny}", "--set", "model.d_model=abc"], "model.d_model"),
    ],
    "-m tokenformer_dist.train": [
        (["--config", "{missing}/c.yaml", "--data", "{empty}", "--run-dir", "{out}"], "no such config file"),
        (["--config", "{tiny}", "--data", "{empty}", "--run-dir", "{out}"], "manifest.json"),
        (["--config", "{tiny}", "--data", "{empty}", "--run-dir", "{out}", "--tp", "3"], "parallel.tp=3"),
        (["--config", "{tiny}", "--data", "{empty}", "--run-dir", "{out}", "--steps", "x"], "--steps"),
        (["--config", "{tiny}", "--data", "{empty}", "--run-dir", "{out}", "--init-from", "{run}"],
         "no complete checkpoint"),
    ],
    "-m tokenformer_dist.evaluate": [
        (["--ckpt", "{missing}", "--data", "{empty}"], "not a run directory"),
        (["--ckpt", "{run}", "--data", "{empty}"], "no complete checkpoint"),
        (["--ckpt", "{weights}", "--data", "{empty}"], "manifest.json"),
        (["--ckpt", "{weights}", "--data", "{empty}", "--tp", "2"], "torchrun --nproc_per_node"),
        (["--ckpt", "{weights}", "--data", "{empty}", "--batches", "0"], "--batches 0"),
    ],
    "-m tokenformer_dist.generate": [
        (["--ckpt", "{missing}", "--prompt", "x"], "not a run directory"),
        (["--ckpt", "{file}", "--prompt", "x"], "not a run directory"),
        (["--ckpt", "{weights}", "--prompt", "x"], "--tokenizer"),  # no tokenizer next to it or its data
        (["--ckpt", "{weights}", "--prompt", "x", "--tp", "3"], "--tp 3"),
        (["--ckpt", "{weights}", "--prompt", "x", "--max-new-tokens", "x"], "--max-new-tokens"),
        (["--ckpt", "{weights}", "--prompt", "x", "--top-p", "2"], "--top-p"),
    ],
    "tools/expand_tokens.py": [
        (["--ckpt", "{missing}", "--out", "{out}", "--tp", "1", "--grow", "1"], "not a run directory"),
        (["--ckpt", "{truncated}", "--out", "{out}", "--tp", "2", "--grow", "1"], "truncated"),
        (["--ckpt", "{weights}", "--out", "{out}", "--tp", "3", "--tokens", "qkv=64,proj=64,ffn=256"],
         "not divisible by parallel.tp=3"),
        (["--ckpt", "{weights}", "--out", "{out}", "--tp", "1", "--grow", "abc"], "--grow"),
    ],
    "-m tokenformer_dist.expand_cli": [  # the main behind tools/expand_tokens.py
        (["--ckpt", "{empty}", "--out", "{out}", "--tp", "1", "--grow", "1"], "not a run directory"),
    ],
    "tools/export_hf.py": [
        (["--ckpt", "{missing}", "--out", "{out}"], "not a run directory"),
        (["--ckpt", "{empty}", "--out", "{out}"], "not a run directory"),
        (["--ckpt", "{weights}", "--out", "{out}", "--tokenizer", "{file}"], "sentencepiece"),
        (["--ckpt", "{weights}", "--out", "{out}", "--tokenizer", "{garbage_model}"], "not a sentencepiece model"),
    ],
    "tools/import_official.py": [
        (["--ckpt", "{missing}", "--out", "{out}"], "no such file"),
        (["--ckpt", "{weights}", "--out", "{out}"], "pytorch_model.bin"),
        (["--ckpt", "{empty}", "--out", "{out}", "--tp", "x"], "--tp"),
    ],
    "tools/plan.py": [
        (["--config", "{missing}/c.yaml", *NODES], "no such config file"),
        (["--config", "{tiny}", *NODES, "--tp", "3"], "--tp 3"),
        (["--config", "{tiny}", *NODES[:-1], "bogus"], "--gpu"),
    ],
    "tools/plot_metrics.py": [
        (["{missing}", "--out", "{out}.png"], "no metrics.jsonl"),
        (["{empty}", "--out", "{out}.png"], "no metrics.jsonl"),
        (["{run}", "--out", "{out}.png", "--x", "bad"], "--x"),
    ],
    "tools/progressive_experiment.py": [
        (["--config", "{missing}/ladder.yaml", "--out", "{out}"], "no such"),
        (["--data", "{file}", "--out", "{out}", "--budget", "test"], "--data"),
        (["--data", "{empty}", "--out", "{out}", "--budget", "bad"], "--budget"),
    ],
    "tools/demo.py": [
        (["--data", "{file}", "--out", "{out}"], "--data"),
        (["--data", "{empty}", "--out", "{out}", "--steps", "0"], "--steps 0"),
        (["--steps", "x"], "--steps"),
    ],
    "-m tokenformer_dist.cadence": [
        (["--config", "{missing}/c.yaml", *NODES], "no such config file"),
        (["--config", "{tiny}", "--nodes", "0", "--gpus-per-node", "8", "--gpu", "h100"], "--nodes 0"),
        (["--config", "{tiny}", *NODES[:-1], "bogus"], "--gpu"),
        (["--config", "{tiny}", *NODES, "--write-gbps", "x"], "--write-gbps"),
    ],
    "data_prep/build.py": [
        (["--input", "{missing}", "--output", "{out}"], "input not found"),
        (["--input", "{empty}", "--output", "{out}", "--vocab-size", "x"], "--vocab-size"),
    ],
}


def entry_points() -> set[str]:
    """Every runnable CLI of the project: package modules with a __main__ block, tools/*.py, data_prep/build.py."""
    found = {f"tools/{p.name}" for p in (REPO / "tools").glob("*.py")} | {"data_prep/build.py"}
    for path in (REPO / "tokenformer_dist").rglob("*.py"):
        if re.search(r'^if __name__ == "__main__":', path.read_text(), re.M):
            found.add("-m " + ".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


def test_every_entry_point_has_cases():
    assert entry_points() == set(CASES)


# ------------------------------------------------------------------------------------ the driver (subprocess)
def tree(roots: list[str]) -> dict[str, tuple[int, int]]:
    """Every path under `roots` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in Path(root).rglob("*")}


def run_entry(entry: str, argv: list[str]) -> int:
    """Run `entry` as the interpreter runs `python -m X ARGV` / `python path ARGV`: its exit status; an uncaught
    exception prints its traceback and gives 1, as the interpreter does."""
    try:
        if entry.startswith("-m "):
            sys.argv = [entry.split()[1], *argv]
            runpy.run_module(entry.split()[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [str(REPO / entry), *argv]
            runpy.run_path(str(REPO / entry), run_name="__main__")
        return 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    except BaseException:
        traceback.print_exc()
        return 1


def drive(entry: str, cases: list[dict]) -> list[dict]:
    """Each case {argv, cwd, watch}: its exit status, its stderr (fd 2) and the watched paths it changed."""
    results = []
    for case in cases:
        os.chdir(case["cwd"])
        warnings.simplefilter("default", append=True)  # any filter change resets the registries: every case sees
        before = tree(case["watch"])                   # its warnings afresh, as a new process would
        with tempfile.TemporaryFile() as err, open(os.devnull, "w") as null:
            sys.stdout.flush(), sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(null.fileno(), 1), os.dup2(err.fileno(), 2)
            try:
                rc = run_entry(entry, case["argv"])
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        after = tree(case["watch"])
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        results.append({"rc": rc, "stderr": stderr, "changed": changed})
    return results


if __name__ == "__main__":  # python tests/test_cli_errors.py ENTRY CASES.json RESULTS.json
    Path(sys.argv[3]).write_text(json.dumps(drive(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))))
    os._exit(0)  # skip interpreter teardown: a case may have left threads (e.g. a data loader) behind


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A TP-2 weights dir of the tiny model (its data.path leads nowhere: no tokenizer), the same with a truncated
    rank file, a run directory with no complete checkpoint, an empty directory, a plain file, a bad .model."""
    from tokenformer_dist.checkpoint.weights import rank_file, write_sharded_weights
    from tokenformer_dist.config import load_config
    from tokenformer_dist.model.tokenformer import TokenFormer

    root = tmp_path_factory.mktemp("cli_inputs")
    cfg = load_config(TINY, ["data.path=" + str(root / "no_dataset")])
    state = TokenFormer(cfg.model, seed=0).state_dict()
    weights = write_sharded_weights(root / "weights", cfg, state.items(), tp=2)
    truncated = write_sharded_weights(root / "truncated", cfg, state.items(), tp=2)
    shard = rank_file(truncated, 1)
    shard.write_bytes(shard.read_bytes()[:-1000])
    (root / "run" / "checkpoints").mkdir(parents=True)
    (root / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a checkpoint\n")
    (root / "garbage.model").write_bytes(b"\x00not a sentencepiece model")
    return {"weights": weights, "truncated": truncated, "run": root / "run", "empty": root / "empty",
            "file": root / "file.txt", "garbage_model": root / "garbage.model", "tiny": TINY}


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory):
    """{entry: [result per case]}, each entry's cases run by one driver subprocess on first use."""
    cache: dict[str, list[dict]] = {}

    def outcome(entry: str, index: int) -> dict:
        if entry not in cache:
            root = tmp_path_factory.mktemp("cli_" + re.sub(r"\W", "_", entry))
            cases = []
            for i, (argv, _) in enumerate(CASES[entry]):
                case_dir = root / str(i)
                (case_dir / "cwd").mkdir(parents=True)  # the user's working directory, empty
                paths = {**{k: str(v) for k, v in inputs.items()}, "missing": str(case_dir / "missing"),
                         "out": str(case_dir / "out")}
                cases.append({"argv": [a.format(**paths) for a in argv], "cwd": str(case_dir / "cwd"),
                              "watch": [str(case_dir), str(inputs["weights"].parent)]})
            (root / "cases.json").write_text(json.dumps(cases))
            env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                     "SLURM_PROCID")}  # a plain process
            proc = subprocess.run([sys.executable, __file__, entry, str(root / "cases.json"),
                                   str(root / "results.json")], capture_output=True, text=True, timeout=600,
                                  cwd=root, env={**env, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1"})
            assert proc.returncode == 0, proc.stderr[-4000:]
            cache[entry] = json.loads((root / "results.json").read_text())
        return cache[entry][index]

    return outcome


@pytest.mark.parametrize(("entry", "index"), [
    pytest.param(entry, i, id=f"{re.split(r'[ ./]', entry.removesuffix('.py'))[-1]}-{i}")
    for entry, cases in CASES.items() for i in range(len(cases))])
def test_bad_input_is_one_line_exit_2_nothing_written(entry, index, outcomes):
    argv, needle = CASES[entry][index]
    got = outcomes(entry, index)
    lines = got["stderr"].strip().splitlines()
    assert got["rc"] == 2, (got["rc"], got["stderr"][-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], got["stderr"][-3000:]
    assert not got["changed"], f"the failed command wrote {got['changed']}"
