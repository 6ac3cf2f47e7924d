"""The compiled training path (`train.compile`, model/compile.py) on CPU, where Inductor's C++ kernels stand
in for Triton's, over real gloo groups and the real DeepSpeed engine; and what keeps a step free of host
waits that a CPU can check.

Launches: one 2-process torchrun — eager and Inductor-compiled runs of 20 fp32 steps at TP 2 × DP 1 (ZeRO 1)
and TP 1 × DP 2 (ZeRO 3 with activation checkpointing; the eager twin at ZeRO 1, which gives the same losses
in fp32), an eager run profiled with --profile, and bf16 runs compiled with the aot_eager backend (the same
graphs, traced and partitioned, without generating kernels: a resumed run and its uninterrupted twin, and
their eager twin) — then one plain process training from a grown checkpoint (traced, new shapes). Each
distinct graph costs a C++ compilation of its kernels on 2 cores, which is why only the two equality runs
and the in-process Pattention checks (fp32 and bf16) generate code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.dist import REPO
from tests.dist_scripts.train_helpers import MULTI, env, launch_runs, losses, metrics, train_argv
from tests.numerics import rel
from tests.test_lean_pattention import saved_bytes
from tokenformer_dist.checkpoint import engine as ckpt_lib
from tokenformer_dist.config import ModelConfig

STEPS = 20
CLIP = 0.05  # below the tiny model's gradient norms: every step is clipped, so a wrong norm shows in the loss
COMPILE = {"train.compile": "true"}
TRACED = {"train.compile": "true", "train.compile_backend": "aot_eager"}
EAGER = {"train.compile": "false"}


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile_runs")
    fp32 = {"train.grad_clip": CLIP}
    bf16 = {"parallel.dtype": "bf16", "train.warmup_frac": 0.0, "train.min_lr": 3e-3, "train.lr": 3e-3}
    proc = launch_runs(2, [
        train_argv(sample_data, root / "eager_tp2", STEPS, tp=2, zero=1, **fp32, **EAGER),
        train_argv(sample_data, root / "compiled_tp2", STEPS, tp=2, zero=1, **fp32, **COMPILE),
        train_argv(sample_data, root / "eager_tp1", STEPS, tp=1, zero=1, **fp32, **EAGER) + ["--profile", "2"],
        train_argv(sample_data, root / "compiled_tp1_z3_ckpt", STEPS, tp=1, zero=3, **fp32, **COMPILE,
                   **{"parallel.activation_checkpointing": "true"}),
        train_argv(sample_data, root / "bf16_split", 3, tp=2, zero=1, **bf16, **TRACED),
        train_argv(sample_data, root / "bf16_split", 6, tp=2, zero=1, **bf16, **TRACED),
        train_argv(sample_data, root / "bf16_whole", 6, tp=2, zero=1, **bf16, **TRACED),
        train_argv(sample_data, root / "bf16_eager", 6, tp=2, zero=1, **bf16, **EAGER),
    ], timeout=900)
    (root / "launch.out").write_text(proc.stdout)
    # growth of the compiled TP-1 run, then (one plain process, TP 1) a traced run from the grown weights at a
    # learning rate of ~0, validated after its one step
    expand = subprocess.run([sys.executable, "tools/expand_tokens.py", "--ckpt", str(root / "compiled_tp1_z3_ckpt"),
                             "--out", str(root / "grown"), "--tp", "1", "--grow", "2", "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert expand.returncode == 0, expand.stderr[-3000:]
    frozen = {"train.lr": 1e-30, "train.min_lr": 0, "train.eval_every": 1, **TRACED}
    grown = train_argv(sample_data, root / "grown_run", 1, tp=1, zero=1, **frozen)
    grown[1] = str(root / "grown" / "config.yaml")
    proc = subprocess.run([sys.executable, str(MULTI), json.dumps([grown + ["--init-from", str(root / "grown")]])],
                          capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return root


def _train_records(run) -> list[dict]:
    return [r for r in metrics(run) if "loss" in r]


@pytest.mark.parametrize(("compiled", "eager"), [("compiled_tp2", "eager_tp2"),
                                                 ("compiled_tp1_z3_ckpt", "eager_tp1")])
def test_compiled_training_matches_eager_fp32(runs, compiled, eager):
    """20 fp32 steps, every one clipped: losses and gradient norms within 1e-4 (measured: ≤ 2e-6; a wrong
    normalizer or a missing recomputation moves the first loss by > 1e-3)."""
    got, ref = _train_records(runs / compiled), _train_records(runs / eager)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) == [r["step"] for r in ref]
    for a, b in zip(got, ref, strict=True):
        assert b["grad_norm"] > CLIP
        assert rel(a["loss"], b["loss"]) <= 1e-4, (compiled, a["step"], a["loss"], b["loss"])
        assert rel(a["grad_norm"], b["grad_norm"]) <= 1e-4, (compiled, a["step"], a["grad_norm"], b["grad_norm"])
    assert got[-1]["loss"] < got[0]["loss"] - 0.5


def test_compiled_checkpoints_keep_every_name(runs):
    """Module.compile keeps parameter names: the compiled run's checkpoint has the eager run's tensors."""
    eager = dict(ckpt_lib.iter_full_weights(runs / "eager_tp2"))
    compiled = dict(ckpt_lib.iter_full_weights(runs / "compiled_tp2"))
    assert compiled.keys() == eager.keys() and not any("_orig_mod" in k for k in compiled)
    for name, t in compiled.items():
        assert t.shape == eager[name].shape, name


def test_compiled_bf16_resume_is_bit_identical(runs):
    got, ref = losses(runs / "bf16_split"), losses(runs / "bf16_whole")
    assert sorted(got) == list(range(1, 7)) == sorted(ref)
    assert got == ref


def test_compiled_bf16_tracks_eager_bf16(runs):
    """The traced bf16 graphs (AOTAutograd's decompositions, the selective-checkpoint recomputation) against
    eager bf16: they differ by bf16 rounding (measured ≤ 3e-4 over 6 steps), a bf16 bug by far more."""
    got, ref = losses(runs / "bf16_whole"), losses(runs / "bf16_eager")
    for step in ref:
        assert rel(got[step], ref[step]) <= 3e-3, (step, got[step], ref[step])


def test_compiled_training_from_a_grown_checkpoint_is_lossless(runs):
    """Lossless growth survives the compiled path (new shapes, recompiled): the grown model's validation loss
    after a step at a learning rate of ~0 equals the original run's final validation loss (fp32)."""
    source = [r["val_loss"] for r in metrics(runs / "compiled_tp1_z3_ckpt") if "val_loss" in r]
    grown = [r["val_loss"] for r in metrics(runs / "grown_run") if "val_loss" in r]
    assert source and grown
    assert ckpt_lib.read_config(runs / "grown_run").model.ffn_tokens == 2 * ckpt_lib.read_config(
        runs / "compiled_tp1_z3_ckpt").model.ffn_tokens
    assert rel(grown[0], source[-1]) <= 1e-5, (grown[0], source[-1])


def test_evaluate_cli_matches_compiled_validation(runs, sample_data):
    """The evaluate CLI (eager) on a compiled run's checkpoint == that run's compiled in-training validation."""
    proc = subprocess.run([sys.executable, "-m", "tokenformer_dist.evaluate", "--ckpt",
                           str(runs / "compiled_tp1_z3_ckpt"),
                           "--data", str(sample_data), "--batches", "8", "--json"],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    val = [r for r in metrics(runs / "compiled_tp1_z3_ckpt") if "val_loss" in r][-1]
    assert val["step"] == STEPS
    assert rel(result["loss"], val["val_loss"]) <= 1e-5, (result["loss"], val["val_loss"])


def test_compile_failure_is_one_line(sample_data, tmp_path):
    """A compiler that cannot run: exit 2 and one line naming train.compile, never eager in disguise."""
    argv = train_argv(sample_data, tmp_path / "run", 2, tp=1, zero=1, **COMPILE)
    proc = subprocess.run([sys.executable, "-m", "tokenformer_dist.train", *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**env(), "CXX": str(tmp_path / "no-such-compiler"),
                                                      "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "train.compile=True" in errors[0] and "train.compile=false" in errors[0], errors
    assert "Traceback" not in proc.stderr
    assert not metrics(tmp_path / "run")  # no step was taken eagerly instead


# ---- the compiled Pattention's memory and numerics, in process ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_lean_pattention_keeps_one_tensor_and_matches(dtype):
    """Compiled, the lean Pattention keeps only A = X·Kᵀ ([tokens, n]) and the [tokens, 1] row sums for
    backward (the eager lean Function's saved set; bench/bench_memory.py's goal ≤ 1.1 × tokens·n), and computes
    the reference's function. Without the checkpoint policy the compiler also keeps Θ(A): 2 × tokens·n."""
    from tokenformer_dist.model.pattention import pattention, reference_pattention

    torch.manual_seed(0)
    tokens, d, n = 96, 32, 160
    keys = torch.nn.Parameter((torch.randn(n, d) * 0.3).to(dtype))
    values = torch.nn.Parameter((torch.randn(n, d) * 0.3).to(dtype))
    tau = torch.tensor(n ** 0.5)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    compiled = torch.compile(lambda t: pattention(t, keys, values, tau), dynamic=False)
    compiled(x).sum().backward()  # compiles
    _, kept = saved_bytes(lambda t, *_: compiled(t), x, keys, values, "l2_norm_gelu")  # x and K, V excluded
    assert kept <= 1.1 * tokens * n * x.element_size(), (kept, tokens * n * x.element_size())

    grad = torch.randn(tokens, d, dtype=dtype)
    outs = []
    for fn in (compiled, lambda t: reference_pattention(t, keys, values, tau)):
        for p in (x, keys, values):
            p.grad = None
        y = fn(x)
        y.backward(grad)
        outs.append([t.float() for t in (y, x.grad, keys.grad, values.grad)])
    # fp32: the same arithmetic up to summation order (measured ≤ 5e-7); bf16: eager rounds after every op,
    # Inductor once per fused chain (measured ≤ 1.6e-2 of the largest entry)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("out", "grad_x", "grad_keys", "grad_values"), *outs, strict=True):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= tol, (name, err)


def test_no_module_keeps_a_stray_tensor():
    """Every tensor a module holds is a parameter or a buffer, so `.to(device)` moves it: a plain tensor
    attribute stays on the CPU and is copied to the GPU at every use (a host wait per call, as the rotary
    frequencies once were). Buffers that are constants of the function stay fp32 under a bf16 cast."""
    from tokenformer_dist.model.tokenformer import TokenFormer

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=16, qkv_tokens=8, proj_tokens=8,
                      ffn_tokens=16)
    model = TokenFormer(cfg).to(torch.bfloat16)
    for name, module in model.named_modules():
        stray = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
        assert not stray, (name, stray)
    constants = {n: b for n, b in model.named_buffers() if n.endswith(("tau", "inv_freq"))}
    assert len(constants) == cfg.n_layers * 6 and all(b.dtype == torch.float32 for b in constants.values())
    assert not any(n.endswith("inv_freq") for n in model.state_dict())  # checkpoints are unchanged


def test_step_profiler_summary(tmp_path):
    """--profile's pieces: the idle fraction is the uncovered share of the step window (overlapping kernels on
    several streams counted once), and a CPU profile of real steps names the operators that took the time."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from tokenformer_dist.training.profiling import busy_fraction, format_summary, summarize

    assert busy_fraction([(0, 10), (5, 20), (30, 40)], 0, 50) == pytest.approx(0.6)
    assert busy_fraction([(-5, 5), (45, 60)], 0, 50) == pytest.approx(0.2)
    a = torch.randn(256, 256)
    got = {}
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=2, repeat=1),
                 on_trace_ready=lambda p: got.update(s=summarize(p.events(), on_gpu=False))) as prof:
        for _ in range(5):
            (a @ a).relu_()
            prof.step()
    s = got["s"]
    assert s["steps"] == 2 and s["device_idle_fraction"] is None
    assert s["top"][0]["name"] == "aten::mm" and "aten::mm" in format_summary(s)


def test_profile_flag_writes_a_trace(runs):
    """`--profile 2` on a real (eager, CPU) run: a Chrome/TensorBoard trace and a summary under
    <run-dir>/profile/ for each rank, and the top-operators table in rank 0's output."""
    profile = runs / "eager_tp1" / "profile"
    for rank in (0, 1):
        traces = list(profile.glob(f"rank{rank}*.pt.trace.json"))
        assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]
        summary = json.loads((profile / f"summary_rank{rank}.json").read_text())
        assert summary["steps"] == 2 and summary["top"]
    assert (runs / "launch.out").read_text().count("profile: 2 steps; top operators by self CPU time:") == 1
