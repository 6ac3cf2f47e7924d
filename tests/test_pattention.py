"""Pattention math against a direct transcription of the official formula; growth with zero keys."""

import math

import pytest
import torch

from tokenformer_dist.model.official import official_pattention
from tokenformer_dist.model.pattention import Pattention, pattention

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def fixed_inputs(n=48, d_in=16, d_out=24, tokens=10):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, d_in, generator=gen)
    keys = torch.randn(n, d_in, generator=gen) * 0.5
    values = torch.randn(n, d_out, generator=gen)
    return x, keys, values


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("norm", NORMS)
def test_matches_official_formula(norm, dtype, tol):
    x, keys, values = (t.to(dtype) for t in fixed_inputs())
    layer = Pattention(16, 24, 48, norm).to(dtype)
    with torch.no_grad():
        layer.key_tokens.copy_(keys)
        layer.value_tokens.copy_(values)
    want = official_pattention(x, keys, values, norm)
    torch.testing.assert_close(pattention(x, keys, values, math.sqrt(48), norm), want, rtol=tol, atol=tol)
    # the module's τ buffer is fp32 by design, so at float64 it matches to fp32 precision of τ
    torch.testing.assert_close(layer(x), want, rtol=max(tol, 2e-7), atol=max(tol, 2e-7))


def test_tau_defaults_to_sqrt_n_and_stays_fp32():
    layer = Pattention(8, 8, 100)
    assert float(layer.tau) == 10.0
    layer = layer.to(torch.bfloat16)
    assert layer.tau.dtype == torch.float32 and layer.key_tokens.dtype == torch.bfloat16


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_appending_zero_key_tokens_keeps_the_function(norm):
    x, keys, values = fixed_inputs()
    tau = math.sqrt(keys.shape[0])
    before = pattention(x, keys, values, tau, norm)
    grown_keys = torch.cat([keys, torch.zeros(80, keys.shape[1])])
    grown_values = torch.cat([values, torch.randn(80, values.shape[1])])  # new values random, as in growth
    after = pattention(x, grown_keys, grown_values, tau, norm)
    # equal up to the matmul's accumulation order (the inner dimension changed)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    # with τ = √n_new (the official code) the same growth changes the output
    official = pattention(x, grown_keys, grown_values, math.sqrt(grown_keys.shape[0]), norm)
    assert (official - before).abs().max() > 1e-3


def test_softmax_growth_is_not_lossless():
    """softmax gives exp(0) = 1 to a zero key: documented as not function-preserving."""
    x, keys, values = fixed_inputs()
    tau = math.sqrt(keys.shape[0])
    grown = pattention(x, torch.cat([keys, torch.zeros(8, 16)]), torch.cat([values, torch.ones(8, 24)]),
                       tau, "softmax")
    assert (grown - pattention(x, keys, values, tau, "softmax")).abs().max() > 1e-3


@pytest.mark.parametrize("norm", NORMS)
def test_all_zero_scores_give_no_nan(norm):
    x, keys, values = fixed_inputs()
    x = x.clone()
    x[2] = 0.0  # this row's scores are all exactly zero
    x.requires_grad_(True)
    keys.requires_grad_(True)
    values.requires_grad_(True)
    out = pattention(x, keys, values, math.sqrt(48), norm)
    out.square().sum().backward()
    for t in (out, x.grad, keys.grad, values.grad):
        assert torch.isfinite(t).all()
    if norm != "softmax":  # Θ(0) = 0 for the GeLU normalizations
        assert out[2].abs().max() == 0
