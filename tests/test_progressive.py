"""The progressive-scaling experiment (tokenformer_dist.progressive): ladder-config validation, the FLOP
accounting and matched-compute comparisons on synthetic curves with known answers, the headline's wording,
and one real end-to-end run (--budget test of a two-stage ladder: 5 trainer launches at TP 1, two at a time,
+ 2 expansions)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dist import REPO, REPO_PYTHONPATH
from tokenformer_dist.config import ConfigError, load_config, param_count
from tokenformer_dist.model.flops import flops_per_token
from tokenformer_dist.progressive import accounting as acc
from tokenformer_dist.progressive.ladder import load_ladder
from tokenformer_dist.progressive.report import headline

TOOL = REPO / "tools" / "progressive_experiment.py"
LADDER = REPO / "configs" / "progressive_mini.yaml"


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_PYTHONPATH}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def _write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(LADDER.read_text())
    edit(raw)
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BAD = [  # (edit of the shipped ladder config, text the one-line error must contain)
    (lambda r: r.update(stages=r["stages"][:1]), "stages must be a list of at least 2"),
    (lambda r: r.update(tp=2) or r["stages"][1]["tokens"].update(qkv=97),
     "stages[1].tokens.qkv=97 is not divisible by tp=2"),
    (lambda r: r["stages"][2]["tokens"].update(ffn=64), "stages[2].tokens.ffn=64 is smaller than"),
    (lambda r: r["stages"][0].pop("steps"), "stages[0].steps is required"),
    (lambda r: r["stages"][1].update(steps=0), "stages[1].steps must be a positive integer"),
    (lambda r: r["stages"][0].update(steps=7), "stages[0].steps=7 must equal scratch.steps="),
    (lambda r: r["stages"][1].update(lr="fast"), "stages[1].lr must be a positive number"),
    (lambda r: r["stages"][1].update(min_lr=1.0), "stages[1].min_lr=1.0 must be <= stages[1].lr"),
    (lambda r: r["stages"][1]["tokens"].update(mlp=3), "unknown key stages[1].tokens.mlp"),
    (lambda r: r["stages"][1].update(name="no_growth"), "must be unique and not 'scratch' or 'no_growth'"),
    (lambda r: r.update(stage=[]), "unknown key stage (valid keys:"),
    (lambda r: r["no_growth"].update(steps=5), "unknown key no_growth.steps"),
    (lambda r: r["scratch"].update(name="big"), "unknown key scratch.name"),
    (lambda r: r.update(budgets={"small": 0.1}), "budgets must be a mapping that includes 'full'"),
    (lambda r: r["budgets"]["full"].update(seeds=0), "budgets.full.seeds must be a positive integer"),
    (lambda r: r["trainer_overrides"].update({"train.steps": 5}), "trainer_overrides.train.steps is set per run"),
    (lambda r: r["budgets"]["small"]["set"].update({"data.seed": 5}), "budgets.small.set must map"),
    (lambda r: r.update(trainer_config="configs/nope.yaml"), "trainer_config 'configs/nope.yaml': no such file"),
]


@pytest.mark.parametrize("edit,message", BAD)
def test_ladder_validation(tmp_path, edit, message):
    with pytest.raises(ConfigError) as err:
        load_ladder(_write(tmp_path, edit))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "ladder.yaml") in str(err.value)


def test_shipped_ladder_meets_the_issue():
    """≥3 seeds at full, ≥2 at small; 2x growth steps; stage 1 on scratch's tokens (the regime check)."""
    ladder = load_ladder(LADDER)
    assert len(ladder.seeds("full")) >= 3 and len(ladder.seeds("small")) >= 2
    for a, b in zip(ladder.stages, ladder.stages[1:], strict=False):
        assert all(b.tokens[k] == 2 * a.tokens[k] for k in a.tokens)
    assert ladder.stages[0].steps == ladder.scratch.steps and ladder.scratch.tokens == ladder.stages[-1].tokens


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
    assert proc.returncode == 2 and "pass --resume to continue it, --overwrite" in proc.stderr
    proc = _cli("--data", nodata, "--out", str(tmp_path / "o3"), "--budget", "test", "--resume", "--overwrite")
    assert proc.returncode == 2 and "--resume and --overwrite: choose one" in proc.stderr
    assert not any((tmp_path / p).exists() for p in ("o1", "o2", "nodata"))


# ---------------------------------------------------------------------- accounting on synthetic curves
def _curve(*points: tuple[float, float]) -> acc.Curve:
    return [{"flops": f, "val_loss": v} for f, v in points]


def test_loss_at_interpolates_linearly_in_flops():
    c = _curve((10.0, 5.0), (20.0, 4.0), (40.0, 3.0))
    assert acc.loss_at(c, 15.0) == pytest.approx(4.5, rel=1e-12)
    assert acc.loss_at(c, 30.0) == pytest.approx(3.5, rel=1e-12)
    assert acc.loss_at(c, 20.0) == 4.0 and acc.loss_at(c, 10.0) == 5.0 and acc.loss_at(c, 40.0) == 3.0
    assert acc.loss_at(c, 9.0) is None and acc.loss_at(c, 41.0) is None  # never extrapolated


def test_flops_to_reach_first_crossing():
    f = acc.flops_to_reach
    c = _curve((10.0, 5.0), (20.0, 4.0), (40.0, 3.0), (50.0, 2.0))
    assert f(c, 3.5) == pytest.approx(30.0, rel=1e-12)
    assert f(c, 4.0) == pytest.approx(20.0, rel=1e-12)
    assert f(c, 6.0) == 10.0 and f(c, 1.0) is None
    assert f(_curve((1.0, 3.0), (3.0, 1.0), (5.0, 4.0), (7.0, 0.5)), 2.0) == pytest.approx(2.0, rel=1e-12)


def test_compute_ratio_and_null_case():
    scratch = _curve((25.0, 5.0), (50.0, 4.0), (100.0, 3.0))  # final 3.0 at 100 FLOPs
    ladder = _curve((10.0, 4.0), (20.0, 3.5), (40.0, 2.5))  # crosses 3.0 at 30
    assert acc.compute_ratio(ladder, scratch) == pytest.approx(0.30, rel=1e-12)
    assert acc.compute_ratio(_curve((10.0, 4.0), (80.0, 3.01)), scratch) is None
    assert acc.aggregate_or_null([0.3, None, 0.4]) is None  # one "never" makes the mean meaningless
    agg = acc.aggregate_or_null([0.2, 0.3, 0.4])
    assert agg["mean"] == pytest.approx(0.3) and agg["per_seed"] == [0.2, 0.3, 0.4]


def test_matched_gain_at_equal_compute():
    assert acc.matched_gain_or_none(_curve((0.0, 4.0), (50.0, 3.0)), _curve((20.0, 3.9), (60.0, 3.1))) is None
    # control: 4.0 at 0 -> 3.0 at 100 (linear); treated ends at 60 FLOPs with 3.1; control there = 3.4
    control = _curve((0.0, 4.0), (100.0, 3.0))
    assert acc.matched_gain(control, _curve((20.0, 3.9), (60.0, 3.1))) == pytest.approx(0.3, rel=1e-12)
    assert acc.matched_gain(control, _curve((20.0, 3.9), (100.0, 3.2))) == pytest.approx(-0.2, rel=1e-12)
    with pytest.raises(ValueError, match="before"):
        acc.matched_gain(_curve((0.0, 4.0), (50.0, 3.0)), _curve((20.0, 3.9), (60.0, 3.1)))


def test_post_growth_bumps():
    stages = [_curve((1.0, 4.0), (2.0, 3.0)), _curve((3.0, 3.25), (4.0, 2.9)), _curve((5.0, 2.8), (6.0, 2.7))]
    assert acc.post_growth_bumps(stages) == pytest.approx([0.25, -0.1], rel=1e-12)


def test_mean_ci95_student_t():
    s = acc.mean_ci95([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    half = 4.303 / math.sqrt(3)
    assert s["mean"] == 2.0 and s["n"] == 3 and s["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-12)
    s = acc.mean_ci95([0.5, 0.7])  # sd 0.1414, t(0.975, 1) = 12.706
    assert s["ci95"] == pytest.approx([0.6 - 12.706 * 0.1, 0.6 + 12.706 * 0.1], rel=1e-9)
    assert acc.mean_ci95([0.25]) == {"mean": 0.25, "ci95": None, "n": 1}


def test_mean_curve_on_common_grid():
    m = acc.mean_curve([_curve((1.0, 4.0), (100.0, 2.0)), _curve((1.0, 6.0), (100.0, 2.0))], points=3)
    assert m["flops"] == pytest.approx([1.0, 10.0, 100.0]) and m["mean"][0] == 5.0 and m["mean"][-1] == 2.0
    assert m["min"][0] == 4.0 and m["max"][0] == 6.0


def _res(gain, regime_ok=True, ratio=None, ratios=(None, None, None), over_scratch=None):
    return {"seeds": [1, 2, 3],
            "regime": {"ok": regime_ok, "scratch_final": 4.0, "small_same_tokens_final": 4.1},
            "growth_gain": acc.mean_ci95(gain), "exact_vs_official": acc.mean_ci95([0.1, 0.12, 0.11]),
            "compute_ratio": ratio, "compute_ratio_per_seed": list(ratios),
            "gain_over_scratch": {"grow_exact": acc.aggregate_or_null(over_scratch or [None])}}


def test_headline_says_what_the_data_says():
    h = headline(_res([0.05, 0.06, 0.07]))
    assert "growth beat the control" in h and "regime ok" in h and "compute_ratio null" in h
    assert "growth did not beat the control measurably" in headline(_res([0.05, -0.04, 0.01]))
    assert "growth did not beat the control: " in headline(_res([-0.05, -0.06, -0.07]))
    assert "lossless growth beat the official recipe" in h
    h = headline(_res([0.05, 0.06, 0.07], regime_ok=False, ratio=acc.aggregate_or_null([0.5, 0.6, 0.7]),
                      ratios=(0.5, 0.6, 0.7)))
    assert h.startswith("REGIME CHECK FAILED") and "compute_ratio 0.60" in h and "\n" not in h
    # no clause where scratch spent less than the ladder (gain_over_scratch null)
    assert "nats below scratch" not in h and "below grow_exact" not in h and "did not differ" not in h
    assert "scratch was 0.070 nats below grow_exact" in headline(_res([0.0, 0.1, 0.2], over_scratch=[-0.06, -0.07,
                                                                                                       -0.08]))
    assert "grow_exact was 0.070 nats below scratch" in headline(_res([0.0, 0.1, 0.2], over_scratch=[0.06, 0.07,
                                                                                                       0.08]))
    assert "did not differ measurably" in headline(_res([0.0, 0.1, 0.2], over_scratch=[0.06, -0.07, 0.01]))


def test_run_jobs_order_concurrency_and_failure():
    """Dependencies first, at most `workers` at once, and a failure stops what depends on it."""
    import threading
    import time

    from tokenformer_dist.progressive.runner import Job, run_jobs

    log, live, peak, lock = [], [0], [0], threading.Lock()

    def work(name, fail=False):
        def fn():
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            time.sleep(0.05)
            with lock:
                live[0] -= 1
                log.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")
        return fn

    jobs = [Job("a", work("a")), Job("b", work("b")), Job("c", work("c"), ["a"]), Job("d", work("d"), ["c", "b"])]
    done = []
    run_jobs(jobs, 2, lambda j, cost, t: done.append((j.name, cost)))
    assert log.index("a") < log.index("c") < log.index("d") and log.index("b") < log.index("d")
    assert peak[0] == 2 and [c for _, c in done] == [1.0, 2.0, 3.0, 4.0]
    log.clear()
    with pytest.raises(RuntimeError, match="a failed"):
        run_jobs([Job("a", work("a", fail=True)), Job("c", work("c"), ["a"])], 2, lambda *_: None)
    assert log == ["a"]


# -------------------------------------------------------------------------------- end to end
def test_end_to_end_budget_test(sample_data, tmp_path):
    """The shipped ladder cut to its first two stages (one growth: 5 trainer launches + 2 expansions)."""
    out = tmp_path / "prog"
    config = _write(tmp_path, lambda r: r.update(stages=r["stages"][:2]))
    proc = _cli("--config", str(config), "--data", str(sample_data), "--out", str(out), "--budget", "test")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    res = json.loads((out / "results.json").read_text())
    ladder = load_ladder(config)
    seeds = ladder.seeds("test")
    assert {"budget", "seeds", "regime", "arms", "growth_gain", "compute_ratio", "settings"} <= set(res)
    assert res["budget"] == "test" and res["seeds"] == seeds
    assert set(res["arms"]) == {"scratch", "no_growth", "grow_exact", "grow_official"}
    assert set(res["regime"]) >= {"scratch_final", "small_same_tokens_final", "ok"}
    assert proc.stdout.strip().splitlines()[-1] == res["headline"]
    md = (out / "results.md").read_text()
    assert res["headline"] in md
    # the prose names the dataset by what it is (its manifest's facts); where it lay is in results.json only
    assert res["settings"]["data"] == str(sample_data.resolve())
    assert "Dataset: the sample corpus of data_prep/build.py" in md and "vocab 8192;" in md
    assert str(sample_data.parent) not in md and str(sample_data.resolve().parent) not in md

    names = [s.name for s in ladder.stages]
    for seed in seeds:
        sd = out / f"seed{seed}"
        cfgs, finals = {}, {}
        for key in ["scratch", names[0], "no_growth", *[f"{a}/{n}" for a in ("grow_exact", "grow_official")
                                                        for n in names[1:]]]:
            run_dir = sd / key
            cfg = load_config(run_dir / "checkpoints" / "latest" / "config.yaml") \
                if (run_dir / "checkpoints" / "latest" / "config.yaml").is_file() else None
            cfg = cfg or load_config(next((run_dir / "checkpoints").glob("step_*/config.yaml")))
            assert cfg.model.vocab_size == 8192 and cfg.parallel.tp == ladder.tp and cfg.train.seed == seed
            rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
            tok_step = cfg.train.micro_batch_size * cfg.model.seq_len
            assert max(r["tokens"] for r in rows if "tokens" in r) == cfg.train.steps * tok_step
            cfgs[key] = (cfg, rows, tok_step)
            finals[key] = [r for r in rows if "val_loss" in r][-1]["val_loss"]
        # scratch and stage 1: same tokens, same data order; the regime check is their final losses
        assert cfgs["scratch"][0].data.seed == cfgs[names[0]][0].data.seed
        i = seeds.index(seed)
        reg = res["regime"]["per_seed"][i]
        assert reg == {"seed": seed, "scratch_final": finals["scratch"], "small_same_tokens_final": finals[names[0]]}

        def flops(key: str, cfgs=cfgs) -> float:
            cfg, _, tok_step = cfgs[key]
            return cfg.train.steps * tok_step * flops_per_token(cfg.model)

        # cumulative FLOPs of each arm's curve, rebuilt from the runs' configs and metrics.jsonl
        def curve(keys: list[str], cfgs=cfgs, flops=flops) -> list[tuple[float, float]]:
            pts, cum = [], 0.0
            for key in keys:
                cfg, rows, tok_step = cfgs[key]
                fpt = flops_per_token(cfg.model)
                pts += [(cum + r["step"] * tok_step * fpt, r["val_loss"]) for r in rows if "val_loss" in r]
                cum += flops(key)
            return pts

        arms = {"scratch": ["scratch"], "no_growth": [names[0], "no_growth"],
                **{a: [names[0], *[f"{a}/{n}" for n in names[1:]]] for a in ("grow_exact", "grow_official")}}
        built = {a: curve(keys) for a, keys in arms.items()}
        for a, pts in built.items():
            got = [(p["flops"], p["val_loss"]) for p in res["arms"][a]["curves"][i]["points"]]
            assert [v for _, v in got] == [v for _, v in pts]
            assert [f for f, _ in got] == pytest.approx([f for f, _ in pts], rel=1e-12)
            assert res["arms"][a]["final_val_loss"][i] == pts[-1][1]
            assert res["arms"][a]["flops"] == pytest.approx(pts[-1][0], rel=1e-12)
        # the control spends at least the ladders' compute, and less than one more of its steps
        ladder_end, ng_end = built["grow_exact"][-1][0], built["no_growth"][-1][0]
        ng_step = cfgs["no_growth"][2] * flops_per_token(cfgs["no_growth"][0].model)
        assert ladder_end <= ng_end < ladder_end + ng_step + 1.0
        assert built["grow_official"][-1][0] == pytest.approx(ladder_end, rel=1e-12)
        assert cfgs[f"grow_exact/{names[1]}"][0].data.seed == cfgs["no_growth"][0].data.seed
        # growth_gain = no_growth's loss interpolated at the ladder's final FLOPs − the ladder's final loss
        (f0, l0), (f1, l1) = next((a, b) for a, b in zip(built["no_growth"], built["no_growth"][1:], strict=False)
                                  if a[0] <= ladder_end <= b[0])
        want = l0 + (ladder_end - f0) / (f1 - f0) * (l1 - l0) - built["grow_exact"][-1][1]
        assert res["growth_gain"]["per_seed"][i] == pytest.approx(want, rel=1e-9, abs=1e-12)
        # compute_ratio: first crossing of scratch's final loss by the grown ladder
        target, reach = finals["scratch"], None
        for (fa, la), (fb, lb) in zip([(None, None), *built["grow_exact"][:-1]], built["grow_exact"], strict=True):
            if lb <= target:
                reach = fb if fa is None else fa + (la - target) / (la - lb) * (fb - fa)
                break
        got = res["compute_ratio_per_seed"][i]
        assert got is None if reach is None else got == pytest.approx(reach / flops("scratch"), rel=1e-9)
        # post-growth bumps: first val loss of each grown stage − final of the stage before
        for a in ("grow_exact", "grow_official"):
            stage_finals = [finals[k] for k in arms[a][:-1]]
            firsts = [[r for r in cfgs[k][1] if "val_loss" in r][0]["val_loss"] for k in arms[a][1:]]
            assert res["arms"][a]["post_growth_bump"][i] == pytest.approx(
                [f - p for f, p in zip(firsts, stage_finals, strict=True)], rel=1e-12)
            # each grown stage started from the previous stage's weights, grown by the tool with this init
            for prev, st, key in zip(ladder.stages, ladder.stages[1:], arms[a][1:], strict=False):
                manifest = json.loads((sd / a / f"expanded_{st.name}" / "manifest.json").read_text())
                assert manifest["old_tokens"] == prev.tokens and manifest["new_tokens"] == st.tokens
                assert manifest["init"] == a.removeprefix("grow_")
                assert "--init-from" in (sd / key / "train.log").read_text().splitlines()[0]
        assert cfgs["no_growth"][0].model.qkv_tokens == ladder.stages[0].tokens["qkv"]
        assert param_count(cfgs["scratch"][0].model) == param_count(cfgs[f"grow_exact/{names[-1]}"][0].model)
    assert (out / "progressive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp*"))

    # --resume after an interruption that lost two runs and a growth: only those run again, and the training
    # is deterministic, so every figure comes out the same
    sd = out / f"seed{seeds[0]}"
    for gone in (out / "results.json", sd / "no_growth", sd / "grow_official"):
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    proc = _cli("--config", str(config), "--data", str(sample_data), "--out", str(out), "--budget", "test",
                "--resume")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "--resume: 3 of 5 runs already finished" in proc.stdout
    again = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in again["runs"] if r["reused"]] == [f"seed{seeds[0]}/{k}" for k in
                                                                ("scratch", names[0], f"grow_exact/{names[1]}")]
    for key in ("growth_gain", "growth_gain_official", "exact_vs_official", "regime", "compute_ratio_per_seed",
                "gain_over_scratch"):
        assert again[key] == res[key], key
    assert again["arms"] == res["arms"]
    # a different plan over the same --out is refused, naming the key, before anything runs
    (tmp_path / "other").mkdir()
    other = _write(tmp_path / "other", lambda r: r.update(stages=r["stages"][:2], lr=1e-3))
    proc = _cli("--config", str(other), "--data", str(sample_data), "--out", str(out), "--budget", "test",
                "--resume")
    assert proc.returncode == 2 and "was trained with train.lr=0.003, this plan has 0.001" in proc.stderr, proc.stderr
    assert (out / "results.json").is_file()
