"""Expansion and resharding of real trainer checkpoints (ZeRO 1 and 3, TP 1/2/4): the function is kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.dist import DIST_SCRIPTS, REPO, torchrun
from tests.dist_scripts.train_helpers import launch_runs, losses, train_argv
from tokenformer_dist.growth.cli import main as expand_main

GROWN = {"qkv": 96, "proj": 80, "ffn": 384}  # tiny.yaml has 64 / 64 / 256
CASES = [  # name, source run, target TP, target counts (None: pure reshard), init
    ("1to2", "tp1_z1", 2, GROWN, "exact"),
    ("2to4", "tp2_z3", 4, GROWN, "exact"),
    ("4to1", "tp4_z1", 1, GROWN, "exact"),
    ("reshard2to1", "tp2_z3", 1, None, "exact"),
    ("official1to2", "tp1_z1", 2, GROWN, "official"),
]


@pytest.fixture(scope="module")
def sources(sample_data, tmp_path_factory):
    """Three short trainer runs in one 4-process launch: TP1×DP4 ZeRO 1, TP2×DP2 ZeRO 3, TP4×DP1 ZeRO 1."""
    root = tmp_path_factory.mktemp("expand_src")
    launch_runs(4, [train_argv(sample_data, root / f"tp{tp}_z{z}", 2, tp=tp, zero=z)
                    for tp, z in ((1, 1), (2, 3), (4, 1))])
    return root


@pytest.fixture(scope="module")
def checks(sources, sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("expand_out")
    cases = [{"name": name, "src": str(sources / run), "dst": str(out / name), "dst_tp": tp, "tokens": tokens,
              "init": init} for name, run, tp, tokens, init in CASES]
    torchrun(DIST_SCRIPTS / "expand_check.py", 4, str(out), str(sample_data), json.dumps(cases))
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", ["1to2", "2to4", "4to1", "reshard2to1"])
def test_exact_expansion_and_reshard_keep_the_function(checks, name):
    _, results = checks
    r = results[name]
    assert r["logits_rel_err"] <= 1e-5
    assert abs(r["val_after"] - r["val_before"]) <= 1e-5 * abs(r["val_before"])
    assert r["src_tp"] != r["dst_tp"]


@pytest.mark.parametrize("name", ["1to2", "2to4", "4to1"])
def test_new_rows_receive_gradient(checks, name):
    step1, step2 = checks[1][name]["new_row_grads"]
    assert step1["key"] > 0  # new keys learn at once (new values are random) ...
    assert step1["value"] == 0  # ... while their zero scores give the new values no gradient yet
    assert step2["key"] > 0 and step2["value"] > 0


def test_official_init_changes_the_function(checks):
    r = checks[1]["official1to2"]
    assert r["logits_rel_err"] > 1e-3 and r["val_after"] != r["val_before"]


def test_training_continues_from_the_expanded_checkpoint(checks, sources, sample_data, tmp_path):
    """The trainer's first step after --init-from the expanded checkpoint sees the old model's loss."""
    out, _ = checks
    old = train_argv(sample_data, tmp_path / "old", 1, tp=1, **{"train.grad_accum_steps": 1})
    old += ["--init-from", str(sources / "tp1_z1")]
    new = train_argv(sample_data, tmp_path / "new", 1, tp=2, **{"train.grad_accum_steps": 2})
    new[new.index("--config") + 1] = str(out / "1to2" / "config.yaml")
    new += ["--init-from", str(out / "1to2")]
    launch_runs(4, [old, new])  # global batch 16 in both: 4 x DP4 x 1, 4 x DP2 x 2
    loss_old, loss_new = losses(tmp_path / "old")[1], losses(tmp_path / "new")[1]
    assert abs(loss_new - loss_old) <= 1e-5 * abs(loss_old)


@pytest.mark.parametrize("args, needle", [
    (["--tp", "3", "--grow", "1"], "not divisible by parallel.tp=3; nearest valid"),
    (["--tp", "2", "--tokens", "qkv=63,proj=64,ffn=256"], "qkv_tokens=63 is fewer than the checkpoint's 64"),
    (["--tp", "4", "--tokens", "qkv=66,proj=64,ffn=256"],
     "qkv_tokens=66 is not divisible by parallel.tp=4; nearest valid: 64 or 68"),
    (["--tp", "2", "--tokens", "qkv=64"], "give all of qkv=N,proj=N,ffn=N"),
    (["--tp", "2", "--config", str(REPO / "configs" / "owt_124m.yaml")], "differs from the checkpoint's"),
    (["--tp", "0", "--grow", "2"], "--tp 0: must be a positive integer"),
])
def test_bad_targets_are_one_line_errors(sources, tmp_path, capsys, args, needle):
    dst = tmp_path / "dst"
    assert expand_main(["--ckpt", str(sources / "tp1_z1"), "--out", str(dst), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not dst.exists() and not any(p.name.startswith(".dst") for p in tmp_path.iterdir())


def test_bad_sources_are_one_line_errors(sources, tmp_path):
    ckpt = sources / "tp2_z3"
    broken = tmp_path / "broken"
    shutil.copytree(ckpt / "checkpoints" / (ckpt / "checkpoints" / "latest").read_text().strip(), broken)
    data = (broken / "model_tp01.safetensors").read_bytes()
    (broken / "model_tp01.safetensors").write_bytes(data[: len(data) // 2])  # truncated shard
    missing = tmp_path / "missing"
    shutil.copytree(broken, missing)
    (missing / "model_tp01.safetensors").unlink()
    for src, needle in ((broken, "model_tp01.safetensors: truncated checkpoint shard"),
                        (missing, "model_tp01.safetensors: missing checkpoint shard"),
                        (tmp_path, "not a run directory")):
        dst = tmp_path / "out"
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "expand_tokens.py"), "--ckpt", str(src),
                               "--out", str(dst), "--tp", "1", "--grow", "2", "--no-progress"],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert not dst.exists()


def test_keep_optimizer_resumes_the_schedule(sources, sample_data, tmp_path):
    """--keep-optimizer: the expanded run resumes at the source's step with its Adam moments and data order,
    so its next loss equals the un-expanded run's next loss (TP1×DP4 → TP2×DP2 with 2 accumulation steps)."""
    src_run = tmp_path / "src"
    shutil.copytree(sources / "tp1_z1", src_run)
    dst = tmp_path / "dst"
    assert expand_main(["--ckpt", str(src_run), "--out", str(dst), "--tp", "2", "--tokens", "qkv=96,proj=80,ffn=384",
                   "--keep-optimizer", "--no-progress"]) == 0
    assert (dst / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    cont = train_argv(sample_data, src_run, 3, tp=1, zero=1)
    grown = train_argv(sample_data, dst, 3, tp=2, zero=2, **{"train.grad_accum_steps": 2})
    grown[grown.index("--config") + 1] = str(dst / "config.yaml")
    launch_runs(4, [cont, grown])
    assert abs(losses(dst)[3] - losses(src_run)[3]) <= 1e-5 * losses(src_run)[3]


def test_keep_optimizer_refuses_zero3_sources(sources, tmp_path, capsys):
    assert expand_main(["--ckpt", str(sources / "tp2_z3"), "--out", str(tmp_path / "dst"), "--tp", "2", "--grow", "1",
                   "--keep-optimizer", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ZeRO-3" in err and "\n" not in err and not (tmp_path / "dst").exists()
