"""Trainer on real gloo process groups and a real DeepSpeed engine (fp32, CPU).

Launches (≈ 2 min on 2 cores): one 4-process launch (TP2×DP2 ZeRO 1/2/3), one 2-process launch (TP1×DP2
reference, DP-change resumes via a universal checkpoint at ZeRO 1 and 3, fp32 and bf16, one from a damaged
checkpoint, --init-from, an uninterrupted baseline), and four short 2-process launches for the kill /
crash-in-save / preemption / finish sequence.
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.dist import REPO
from tests.dist_scripts.train_helpers import (
    env,
    launch_runs,
    losses,
    metrics,
    start_train,
    train_argv,
    wait_for_step,
    worker_pids,
)
from tests.numerics import rel
from tokenformer_dist.checkpoint import engine as ckpt_lib
from tokenformer_dist.training.cli import EXIT_PREEMPTED

# below the tiny model's gradient norms, so every step is clipped: a wrong norm changes the losses
CLIP = 0.05
STEPS = 6
GROWTH_INITS = ("exact", "official")
# bf16 against its fp32 twin (6 steps moving the loss by 0.82), measured: loss and val loss differ by at most
# 2.0e-4. Upper bound 1e-3: bf16 numerics 5x further from fp32 than these fail. Lower bound 2e-5: with bf16
# switched off the "bf16" runs are the fp32 ones (difference 0). Lean Pattention's normalizers summed in bf16
# move it only to 2.6e-4, inside both: tests/test_lean_pattention.py catches that bug.
BF16_MAX_REL, BF16_MIN_REL = 1e-3, 2e-5
# growth of the bf16 run, first val loss in bf16 against the ungrown model's, measured: 5.4e-6 for the exact
# (function-preserving) growth, 4.7e-3 for --init official
BF16_GROWTH_REL = 5e-5


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tp2 = [train_argv(sample_data, root / f"tp2_z{z}", STEPS, tp=2, zero=z, **{"train.grad_clip": CLIP,
                                                                         "train.save_every": 3,
                                                                         "train.keep_last": 5})
           for z in (1, 2, 3)]
    # bf16 (CPU): a twin of tp2_z1; a resumed constant-LR pair (3 steps, then on to 6 in the same dir) and
    # its uninterrupted twin; ZeRO-3 (fp32 gradient partitions)
    bf16 = {"parallel.dtype": "bf16"}
    const = {**bf16, "train.warmup_frac": 0.0, "train.min_lr": 3e-3, "train.lr": 3e-3}
    # saves: a step-3 checkpoint to resume at another DP size
    clipped = {"train.grad_clip": CLIP, **bf16, "train.save_every": 3, "train.keep_last": 5}
    tp2 += [train_argv(sample_data, root / "bf16_z1", STEPS, tp=2, zero=1, **clipped),
            train_argv(sample_data, root / "bf16_z3", STEPS, tp=2, zero=3, **clipped),
            train_argv(sample_data, root / "bf16_split", 3, tp=2, zero=1, **const),
            train_argv(sample_data, root / "bf16_split", STEPS, tp=2, zero=1, **const),
            train_argv(sample_data, root / "bf16_whole", STEPS, tp=2, zero=1, **const)]
    launch_runs(4, tp2)
    # expansion of the bf16 run (its checkpoint keeps fp32 master weights), evaluated in bf16 below; the
    # official init (not function-preserving) is the control the lossless check must fail
    for init in GROWTH_INITS:
        expand = subprocess.run([sys.executable, "tools/expand_tokens.py", "--ckpt", str(root / "bf16_z1"), "--out",
                                 str(root / f"bf16_grown_{init}"), "--tp", "2", "--grow", "2", "--init", init,
                                 "--no-progress"], capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
        assert expand.returncode == 0, expand.stderr[-3000:]
    ref = train_argv(sample_data, root / "tp1", STEPS, tp=1, zero=1,
                     **{"train.grad_clip": CLIP, "train.keep_last": 1})
    # DP changes: the TP2×DP2 runs' step-3 checkpoints resumed at TP2×DP1 (micro 8 keeps the global batch)
    resumes = []
    for src, dst, zero, dtype in DP_CHANGES:
        _copy_checkpoint(root / src, root / dst, 3)
        resumes.append(train_argv(sample_data, root / dst, STEPS, tp=2, zero=zero, **{
            "train.grad_clip": CLIP, "train.micro_batch_size": 8, "parallel.dtype": dtype}))
    # ... and from a damaged one (a ZeRO partition missing): rank 0's conversion fails, every rank stops
    _copy_checkpoint(root / "tp2_z1", root / "damaged", 3)
    (root / "damaged" / "checkpoints" / "step_00000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    resumes.append(train_argv(sample_data, root / "damaged", STEPS, tp=2, zero=1, **{"train.micro_batch_size": 8}))
    init = train_argv(sample_data, root / "init", 1, tp=2, zero=2, **{"train.lr": 1e-30, "train.min_lr": 0})
    init += ["--init-from", str(root / "tp2_z1")]
    frozen = {"train.lr": 1e-30, "train.min_lr": 0, "parallel.dtype": "bf16", "train.eval_every": 1}
    same = train_argv(sample_data, root / "bf16_same", 1, tp=2, zero=1, **frozen) + ["--init-from",
                                                                                      str(root / "bf16_z1")]
    grown = []
    for how in GROWTH_INITS:
        argv = train_argv(sample_data, root / f"bf16_grown_{how}_run", 1, tp=2, zero=1, **frozen)
        argv[1] = str(root / f"bf16_grown_{how}" / "config.yaml")
        grown.append(argv + ["--init-from", str(root / f"bf16_grown_{how}")])
    second = [ref, *resumes, init, same, *grown]
    launch = launch_runs(2, second, check=False, extra_env={"TRAIN_MULTI_REPORT": str(root / "outcomes")})
    # every run but the damaged one must finish on both ranks (the tests below read them); the damaged run's
    # outcome is test_a_failed_universal_conversion_stops_every_rank_with_one_line's to judge
    damaged_run = second.index(resumes[-1])
    per_rank = _outcomes(root)
    unexpected = [(rank, second[i][second[i].index("--run-dir") + 1], o) for rank, outcomes in enumerate(per_rank)
                  for i, o in enumerate(outcomes) if i != damaged_run and o["code"] != 0]
    if unexpected or [len(outcomes) for outcomes in per_rank] != [len(second)] * 2:
        pytest.fail(f"runs other than the damaged one failed or did not finish (torchrun exit {launch.returncode});"
                    f" (rank, run dir, outcome): {unexpected}; runs finished per rank: "
                    f"{[len(outcomes) for outcomes in per_rank]} of {len(second)}\n"
                    f"--- stderr\n{launch.stderr[-6000:]}")
    (root / "outcomes" / "damaged_run.json").write_text(json.dumps({"index": damaged_run,
                                                                   "stderr": launch.stderr}))
    return root


# (source run, resumed run, ZeRO stage, dtype): each source's step-3 checkpoint resumed at half its DP size
DP_CHANGES = [("tp2_z1", "tp2_dp1", 1, "fp32"), ("tp2_z3", "tp2_z3_dp1", 3, "fp32"),
              ("bf16_z1", "bf16_z1_dp1", 1, "bf16"), ("bf16_z3", "bf16_z3_dp1", 3, "bf16")]


def _outcomes(root: Path) -> list[list[dict]]:
    """What each rank of the fixture's 2-process launch saw: one {"code", "error"} per run (train_multi.py)."""
    return [json.loads(f.read_text()) if f.is_file() else [] for f in (root / "outcomes" / "rank0.json",
                                                                      root / "outcomes" / "rank1.json")]


def _copy_checkpoint(src_run, dst_run, step: int) -> None:
    """A run directory holding only `src_run`'s checkpoint at `step` (as latest)."""
    tag = ckpt_lib.tag_for(step)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    (dst_run / "checkpoints" / "latest").write_text(tag + "\n")


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_tp2_dp2_matches_tp1_dp2(runs, zero):
    ref, got = metrics(runs / "tp1"), metrics(runs / f"tp2_z{zero}")
    ref = [r for r in ref if "loss" in r]
    got = [r for r in got if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) == [r["step"] for r in ref]
    for a, b in zip(got, ref, strict=True):
        assert b["grad_norm"] > CLIP  # clipping is active
        assert rel(a["loss"], b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert rel(a["grad_norm"], b["grad_norm"]) <= 1e-5, (a["step"], a["grad_norm"], b["grad_norm"])
        assert a["lr"] == b["lr"]
    assert got[-1]["loss"] < got[0]["loss"]


def test_metrics_and_checkpoint_layout(runs):
    run = runs / "tp2_z1"
    rec = metrics(run)[0]
    for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "flops_per_s", "mem_gb", "tokens"):
        assert key in rec
    assert any((run / "tb").iterdir())
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000006"
    ckpt = root / "step_00000006"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["step"], meta["tp"], meta["dp"], meta["zero_stage"]) == (6, 2, 2, 1)
    assert meta["tokens"] == 6 * 4 * 2 * 64 and "loader" in meta
    assert ckpt_lib.read_config(run).model.seq_len == 64
    for f in ("config.yaml", "model_tp00.safetensors", "model_tp01.safetensors",
              "mp_rank_00_model_states.pt"):
        assert (ckpt / f).is_file(), f
    assert not list(root.glob("*.partial"))
    # keep_last=1 in the TP1 run: only the final checkpoint is left
    assert sorted(p.name for p in (runs / "tp1" / "checkpoints").glob("step_*")) == ["step_00000006"]


@pytest.mark.parametrize(("src", "dst", "zero", "dtype"), DP_CHANGES, ids=[d[1] for d in DP_CHANGES])
def test_resume_at_other_dp_size_via_universal(runs, src, dst, zero, dtype):
    """Steps 4-6 after resuming at DP 1 equal the DP-2 run's: fp32 within 1e-5 (as TP1 vs TP2), bf16 within
    1e-4 (its forward at micro-batch 8 instead of 4 rounds differently). ZeRO 3 also checks
    checkpoint.engine.load_engine_checkpoint's repairs (a shared Adam step counter: 5e-4 off at step 6; the
    no-decay group decayed: 3e-5) and the TP blocks of sharding.universal_restore_meta (without them the
    load fails)."""
    ref, got = losses(runs / src), losses(runs / dst)
    assert (runs / dst / "checkpoints" / "step_00000003" / "universal").is_dir()
    assert sorted(got) == list(range(4, STEPS + 1))  # the copied run dir starts at the checkpoint
    tolerance = 1e-5 if dtype == "fp32" else 1e-4
    for step in range(4, STEPS + 1):
        assert rel(got[step], ref[step]) <= tolerance, (step, got[step], ref[step])
    meta = ckpt_lib.read_meta(runs / dst / "checkpoints" / "step_00000006")
    assert (meta["dp"], meta["tokens"], meta["zero_stage"], meta["dtype"]) == (1, 6 * 8 * 64, zero, dtype)


def pickled_globals(path: Path) -> set[str]:
    """`module.name` of every global a torch.save file's pickle would import when loaded."""
    found = set()
    with zipfile.ZipFile(path) as z:
        for member in (n for n in z.namelist() if n.endswith(".pkl")):
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(z.read(member)):
                if op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.add(".".join(strings[-2:]))
                if isinstance(arg, str):
                    strings.append(arg)
    return found


def test_checkpoints_pickle_nothing_of_this_package(runs, tmp_path):
    """DeepSpeed's .pt files (model states, ZeRO 1/2/3 partitions fp32 and bf16, universal conversions) name
    only torch / DeepSpeed / stdlib classes: a checkpoint keeps loading when this package's modules move or
    rename, and loading one executes nothing of ours."""
    files = sorted(runs.rglob("*.pt"))
    assert any("universal" in f.parts for f in files) and any("optim_states" in f.name for f in files)
    ours = {f"{f.relative_to(runs)}: {g}" for f in files for g in pickled_globals(f)
            if g.startswith("tokenformer_dist")}
    assert not ours, sorted(ours)[:5]
    # the scan sees a pickled object of the package when there is one
    torch.save({"cfg": ckpt_lib.read_config(runs / "tp2_z1")}, tmp_path / "bad.pt")
    assert "tokenformer_dist.config.Config" in pickled_globals(tmp_path / "bad.pt")


def test_a_failed_universal_conversion_stops_every_rank_with_one_line(runs):
    """Rank 0 converts while the others wait: its error reaches every rank (no rank left in a collective), each
    prints it as one line and the launch goes on to the next run."""
    damaged = runs / "damaged" / "checkpoints" / "step_00000003"
    launch = json.loads((runs / "outcomes" / "damaged_run.json").read_text())
    seen = [outcomes[launch["index"]] for outcomes in _outcomes(runs)]
    assert [o["code"] for o in seen] == [2, 2], seen
    assert seen[0]["error"] == seen[1]["error"], seen  # rank 0's error, not each rank's own
    assert seen[0]["error"].startswith(f"{damaged}: ds_to_universal failed: ") and "\n" not in seen[0]["error"], seen
    # what the user reads: the line once per rank (counted in the text, since the ranks share one stderr pipe)
    assert launch["stderr"].count(f"error: {seen[0]['error']}\n") == 2, launch["stderr"][-3000:]
    assert not (damaged / "universal").exists()


def test_init_from_takes_weights_only(runs):
    src = dict(ckpt_lib.iter_full_weights(runs / "tp2_z1"))
    got = dict(ckpt_lib.iter_full_weights(runs / "init"))
    assert src.keys() == got.keys()
    for name, t in src.items():  # lr 1e-30: one step leaves the loaded weights as they were
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=name)
    assert ckpt_lib.read_meta(ckpt_lib.resolve_checkpoint(runs / "init"))["step"] == 1  # fresh schedule


def _run_until_end(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run did not exit within {timeout} s")
    return proc.returncode, time.monotonic() - t0


def test_kill_crash_preempt_resume_is_bit_identical(sample_data, tmp_path):
    """kill -9 of one rank -> the other exits; crash inside a checkpoint write -> previous one is loaded;
    SIGUSR1 -> checkpoint + exit 75; every restart resumes, and the whole loss sequence equals an
    uninterrupted run's bit for bit."""
    n = 40
    sets = {"train.save_every": 5, "train.keep_last": 3}
    base = tmp_path / "base"
    launch_runs(2, [train_argv(sample_data, base, n, tp=2, zero=2, **sets)])
    run = tmp_path / "run"
    argv = train_argv(sample_data, run, n, tp=2, zero=2, **sets)

    # 1. kill -9 one rank mid-training: the other must exit within 60 s (no hang)
    proc = start_train(2, argv)
    wait_for_step(proc, run, 8)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    rc, took = _run_until_end(proc, 90)
    assert rc != 0 and took < 60, (rc, took)
    first = ckpt_lib.latest_tag(run)
    assert first is not None
    resumed_at = int(first.split("_")[1])

    # 2. crash (SIGKILL) inside the next checkpoint write: `latest` must keep pointing at the previous one
    crash_step = resumed_at + 5
    proc = start_train(2, argv, {"TOKENFORMER_DIST_FAULT": f"kill_during_save:{crash_step}:0"})
    rc, took = _run_until_end(proc, 120)
    out = proc.stdout.read()
    assert rc != 0 and took < 90, (rc, out[-2000:])
    assert f"resumed from {run / 'checkpoints' / first}" in out
    assert ckpt_lib.latest_tag(run) == first
    assert (run / "checkpoints" / f"step_{crash_step:08d}.partial").is_dir()  # the torn write, ignored

    # 3. preemption: SIGUSR1 to one rank -> every rank saves at the step boundary, exit 75
    proc = start_train(2, argv)
    wait_for_step(proc, run, crash_step + 2)
    os.kill(worker_pids(proc.pid)[0], signal.SIGUSR1)
    rc, _ = _run_until_end(proc, 120)
    out = proc.stdout.read()
    assert f"resumed from {run / 'checkpoints' / first}" in out
    assert rc != 0 and "exitcode  : 75" in out or rc == EXIT_PREEMPTED, (rc, out[-2000:])
    preempt_tag = ckpt_lib.latest_tag(run)
    assert preempt_tag is not None and int(preempt_tag.split("_")[1]) > crash_step

    # 4. finish, then compare with the uninterrupted run bit for bit
    launch_runs(2, [argv])
    got, ref = losses(run), losses(base)
    assert sorted(got) == list(range(1, n + 1)) == sorted(ref)
    assert got == ref


def test_evaluate_cli_reshards_under_torchrun(runs, sample_data):
    """torchrun, 2 processes at --tp 2, of the TP1×DP2 checkpoint (resharded as it is loaded) == that trainer's
    own final validation loss."""
    from tests.dist_scripts.train_helpers import env, torchrun_cmd

    cmd = torchrun_cmd(2, "-m", "tokenformer_dist.evaluate", "--ckpt", str(runs / "tp1"), "--tp", "2",
                       "--data", str(sample_data), "--batches", "8", "--json")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written at tp 1, evaluated at tp 2" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    val = [r for r in metrics(runs / "tp1") if "val_loss" in r][-1]
    assert val["step"] == STEPS and result["tokens"] == 8 * 4 * 64
    assert val["val_dtype"] == "fp32" and "(fp32 master weights)" in proc.stdout  # both say what they ran
    assert rel(result["loss"], val["val_loss"]) <= 1e-5


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_evaluate_at_tp1_from_tp2_checkpoint(runs, sample_data, zero, capsys, monkeypatch):
    """One plain process (TP 1, no process group) reading the TP2×DP2 checkpoint of each ZeRO stage == the
    trainer's own final validation loss at TP 2."""
    from tokenformer_dist.inference import evaluate

    for var in ("WORLD_SIZE", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert evaluate.main(["--ckpt", str(runs / f"tp2_z{zero}"), "--data", str(sample_data), "--batches", "8",
                          "--json"]) == 0
    out = capsys.readouterr().out
    assert "written at tp 2, evaluated at tp 1" in out
    result = json.loads(out.strip().splitlines()[-1])
    val = [r for r in metrics(runs / f"tp2_z{zero}") if "val_loss" in r][-1]
    assert val["step"] == STEPS and result["tokens"] == 8 * 4 * 64
    assert rel(result["loss"], val["val_loss"]) <= 1e-5, (result["loss"], val["val_loss"])


def test_bf16_trains_and_tracks_fp32(runs):
    """bf16 (fp32 master weights, fp32 gradient reduction and accumulation) against the fp32 twin run: close
    to it, and not equal to it (the dtypes themselves: tests/test_bf16_engine.py)."""
    for name in ("bf16_z1", "bf16_z3"):
        ref = [r for r in metrics(runs / "tp2_z1") if "loss" in r]
        got = [r for r in metrics(runs / name) if "loss" in r]
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        diffs = [rel(a["loss"], b["loss"]) for a, b in zip(got, ref, strict=True)]
        assert max(diffs) <= BF16_MAX_REL, (name, diffs)
        assert max(diffs) >= BF16_MIN_REL, (name, diffs)
        assert got[-1]["loss"] < got[0]["loss"]
        assert {r["val_dtype"] for r in metrics(runs / name) if "val_loss" in r} == {"bf16"}
        val = [r["val_loss"] for r in metrics(runs / name) if "val_loss" in r][-1]
        ref_val = [r["val_loss"] for r in metrics(runs / "tp2_z1") if "val_loss" in r][-1]
        assert BF16_MIN_REL <= rel(val, ref_val) <= BF16_MAX_REL, (name, val, ref_val)
        assert ckpt_lib.read_meta(ckpt_lib.resolve_checkpoint(runs / name))["dtype"] == "bf16"


def test_bf16_resume_is_bit_identical(runs):
    got, ref = losses(runs / "bf16_split"), losses(runs / "bf16_whole")
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    assert got == ref


@pytest.mark.parametrize("init", GROWTH_INITS)
def test_expansion_of_a_bf16_run_is_lossless_in_bf16(runs, init):
    """Exact growth keeps the bf16 val loss; the official init, which changes the function, must fail the
    same check (so that the check can fail)."""
    same = [r["val_loss"] for r in metrics(runs / "bf16_same") if "val_loss" in r]
    grown = [r["val_loss"] for r in metrics(runs / f"bf16_grown_{init}_run") if "val_loss" in r]
    assert same and grown
    assert ckpt_lib.read_config(runs / f"bf16_grown_{init}_run").model.qkv_tokens > ckpt_lib.read_config(
        runs / "bf16_same").model.qkv_tokens
    lossless = rel(grown[0], same[0]) <= BF16_GROWTH_REL
    assert lossless == (init == "exact"), (init, grown[0], same[0])
