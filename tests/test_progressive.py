"""tools/progressive_experiment.py: ladder-config validation, the compute-ratio interpolation, and one real
end-to-end run (--budget test: 4 torchrun launches of the trainer at TP 2 + 2 expansions, ~70-100 s)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dist import REPO
from tokenformer_dist.config import ConfigError, load_config, param_count
from tokenformer_dist.metrics import flops_per_token

TOOL = REPO / "tools" / "progressive_experiment.py"
LADDER = REPO / "configs" / "progressive_mini.yaml"


@functools.cache
def _tool():
    spec = importlib.util.spec_from_file_location("progressive_experiment", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def _write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(LADDER.read_text())
    edit(raw)
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BAD = [  # (edit of the shipped ladder config, text the one-line error must contain)
    (lambda r: r.update(stages=r["stages"][:2]), "stages must be a list of at least 3"),
    (lambda r: r["stages"][1]["tokens"].update(qkv=97), "stages[1].tokens.qkv=97 is not divisible by tp=2"),
    (lambda r: r["stages"][2]["tokens"].update(ffn=64), "stages[2].tokens.ffn=64 is smaller than"),
    (lambda r: r["stages"][0].pop("steps"), "stages[0].steps is required"),
    (lambda r: r["stages"][0].update(steps=0), "stages[0].steps must be a positive integer"),
    (lambda r: r["stages"][1].update(lr="fast"), "stages[1].lr must be a positive number"),
    (lambda r: r["stages"][1].update(min_lr=1.0), "stages[1].min_lr=1.0 must be <= stages[1].lr"),
    (lambda r: r["stages"][1]["tokens"].update(mlp=3), "unknown key stages[1].tokens.mlp"),
    (lambda r: r.update(stage=[]), "unknown key stage (valid keys:"),
    (lambda r: r.update(init="random"), "init must be one of exact, official"),
    (lambda r: r["scratch"].update(name="big"), "unknown key scratch.name"),
    (lambda r: r.update(budgets={"small": 0.1}), "budgets must be a mapping that includes 'full'"),
    (lambda r: r["trainer_overrides"].update({"train.steps": 5}), "trainer_overrides.train.steps is set per run"),
    (lambda r: r.update(trainer_config="configs/nope.yaml"), "trainer_config 'configs/nope.yaml': no such file"),
]


@pytest.mark.parametrize("edit,message", BAD)
def test_ladder_validation(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=None) as err:
        _tool().load_ladder(_write(tmp_path, edit))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "ladder.yaml") in str(err.value)


def test_cli_errors(tmp_path):
    """Bad trainer keys, unknown budgets and a non-empty --out: one line on stderr, exit 2, nothing launched."""
    bad = _write(tmp_path, lambda r: r["trainer_overrides"].update({"model.d_modell": 64}))
    nodata = str(tmp_path / "nodata")  # not built: nothing may be built or launched before the checks
    proc = _cli("--config", str(bad), "--data", nodata, "--out", str(tmp_path / "o1"), "--budget", "test")
    assert proc.returncode == 2 and "unknown key 'model.d_modell'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "ladder.yaml" in proc.stderr
    proc = _cli("--data", nodata, "--out", str(tmp_path / "o2"), "--budget", "huge")
    assert proc.returncode == 2 and "--budget 'huge': valid budgets" in proc.stderr and "small" in proc.stderr
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "results.json").write_text("{}")
    proc = _cli("--data", nodata, "--out", str(tmp_path / "o3"), "--budget", "test")
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    assert not any((tmp_path / p).exists() for p in ("o1", "o2", "nodata"))


def test_flops_to_reach_interpolates_linearly_in_flops():
    f = _tool().flops_to_reach
    curve = [{"flops": 10.0, "val_loss": 5.0}, {"flops": 20.0, "val_loss": 4.0}, {"flops": 40.0, "val_loss": 3.0},
             {"flops": 50.0, "val_loss": 2.0}]
    assert f(curve, 3.5) == pytest.approx(30.0, rel=1e-12)
    assert f(curve, 4.0) == pytest.approx(20.0, rel=1e-12)
    assert f(curve, 6.0) == 10.0  # reached at the first eval point
    assert f(curve, 1.0) is None
    # a curve that dips below, rises, and dips again: the FIRST crossing counts
    assert f([{"flops": 1.0, "val_loss": 3.0}, {"flops": 3.0, "val_loss": 1.0}, {"flops": 5.0, "val_loss": 4.0},
              {"flops": 7.0, "val_loss": 0.5}], 2.0) == pytest.approx(2.0, rel=1e-12)


def test_end_to_end_budget_test(sample_data, tmp_path):
    out = tmp_path / "prog"
    proc = _cli("--data", str(sample_data), "--out", str(out), "--budget", "test")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    res = json.loads((out / "results.json").read_text())
    ladder = yaml.safe_load(LADDER.read_text())
    stages = res["progressive"]["stages"]
    assert [s["name"] for s in stages] == [s["name"] for s in ladder["stages"]]
    assert res["scratch"]["tokens"] == ladder["stages"][-1]["tokens"] and res["expansion_flops"] == 0.0

    # FLOPs accounting against the trainer configs the runs really used and their metrics.jsonl
    run_dirs = [out / "scratch"] + [out / f"stage{i + 1}_{s['name']}" for i, s in enumerate(stages)]
    cum = 0.0
    for rec, run_dir in zip([res["scratch"], *stages], run_dirs, strict=True):
        cfg = load_config(run_dir / "config.yaml")
        assert cfg.model.vocab_size == 8192 and cfg.parallel.tp == 2  # the sample dataset's vocabulary
        assert {"qkv": cfg.model.qkv_tokens, "proj": cfg.model.proj_tokens, "ffn": cfg.model.ffn_tokens} == \
            rec["tokens"]
        tok_step = cfg.train.micro_batch_size * cfg.model.seq_len  # DP 1
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(r["tokens"] for r in rows if "tokens" in r) == cfg.train.steps * tok_step == rec["train_tokens"]
        fpt = flops_per_token(cfg.model)
        assert rec["flops_per_token"] == fpt and rec["params"] == param_count(cfg.model)
        assert rec["flops"] == pytest.approx(cfg.train.steps * tok_step * fpt, rel=1e-12)
        evals = [r for r in rows if "val_loss" in r]
        assert len(evals) == len(rec["curve"]) >= 2 and evals[-1]["step"] == cfg.train.steps
        start = 0.0 if rec is res["scratch"] else cum
        for point, ev in zip(rec["curve"], evals, strict=True):
            assert point["val_loss"] == ev["val_loss"]
            assert point["flops"] == pytest.approx(start + ev["step"] * tok_step * fpt, rel=1e-12)
        if rec is not res["scratch"]:
            assert rec["cum_flops_start"] == pytest.approx(cum, rel=1e-12)
            cum += rec["flops"]
            assert rec["cum_flops_end"] == pytest.approx(cum, rel=1e-12)
    assert res["progressive"]["flops"] == pytest.approx(cum, rel=1e-12)

    # compute_ratio recomputed from the ladder curve (first crossing of the scratch run's final val loss)
    target = res["target_val_loss"]
    assert target == res["scratch"]["curve"][-1]["val_loss"]
    pts = [(p["flops"], p["val_loss"]) for p in res["progressive"]["curve"]]
    reach = None
    for (f0, l0), (f1, l1) in zip([(None, None), *pts[:-1]], pts, strict=True):
        if l1 <= target:
            reach = f1 if f0 is None else f0 + (l0 - target) / (l0 - l1) * (f1 - f0)
            break
    if reach is None:
        assert res["compute_ratio"] is None
    else:
        assert res["compute_ratio"] == pytest.approx(reach / res["scratch"]["flops"], rel=1e-9)
    # the later stages started from the grown weights of the stage before
    for i, s in enumerate(stages[1:], start=1):
        manifest = json.loads((out / "expanded" / s["name"] / "manifest.json").read_text())
        assert manifest["new_tokens"] == s["tokens"] and manifest["old_tokens"] == stages[i - 1]["tokens"]
        assert "--init-from" in (run_dirs[i + 1] / "train.log").read_text().splitlines()[0]
    assert (out / "progressive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "compute_ratio" in md and md.count("| ladder: ") == len(stages)
    assert not list(out.glob(".*.tmp*"))
