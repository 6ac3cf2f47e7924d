"""TP invariance of the whole model: same master weights at TP 1, 2 and 4 (4 real gloo processes)."""

import json

import pytest
import torch

from tests.dist import DIST_SCRIPTS, torchrun

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    torchrun(DIST_SCRIPTS / "tp_invariance.py", 4, str(out))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("tp", [2, 4])
def test_logits_loss_grads_match_tp1(tp_runs, norm, tp):
    ref = torch.load(tp_runs / f"tp1_{norm}.pt", weights_only=True)
    got = torch.load(tp_runs / f"tp{tp}_{norm}.pt", weights_only=True)
    assert got["logits"].shape == ref["logits"].shape
    assert rel_err(got["logits"], ref["logits"]) <= 1e-5
    assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-5 * abs(ref["loss"].item())
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert got["grads"][name].shape == g.shape, name
        assert g.norm() > 0, f"{name} received no gradient"
        assert rel_err(got["grads"][name], g) <= 1e-5, name


@pytest.mark.parametrize("norm", NORMS)
def test_single_device_model_matches_tp1(tp_runs, norm):
    """The plain model (torch only: no process group, no parallelize) computes what TP 1 computes."""
    ref = torch.load(tp_runs / f"tp1_{norm}.pt", weights_only=True)
    got = torch.load(tp_runs / f"tp0_{norm}.pt", weights_only=True)
    assert rel_err(got["logits"], ref["logits"]) <= 1e-6
    assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-6 * abs(ref["loss"].item())
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert rel_err(got["grads"][name], g) <= 1e-6, name


def test_plain_model_imports_no_megatron(tp_runs):
    report = json.loads((tp_runs / "report.json").read_text())
    assert report["megatron_modules_of_plain_model"] == []


def test_meta_built_model_equals_parallelized_model(tp_runs):
    """build_parallel_model (meta device, only this rank's shards allocated) gives the same weights."""
    report = json.loads((tp_runs / "report.json").read_text())
    flags = {k: v for k, v in report.items() if k.startswith("built_equals_parallelized_")}
    assert len(flags) == 9 and all(flags.values()), flags


def test_param_count_matches_config_formula(tp_runs):
    report = json.loads((tp_runs / "report.json").read_text())
    for tp in (1, 2, 4):
        assert report[f"params_tp{tp}"] == report["analytic_params"]


def test_unpartitionable_attention_is_a_clear_error(tp_runs):
    report = json.loads((tp_runs / "report.json").read_text())
    msg = report["pair_error"]
    assert msg is not None and "micro-batch 1 x 6 heads" in msg and "tp=4" in msg and "multiple of 2" in msg
