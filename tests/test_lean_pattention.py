"""The memory-lean Pattention (lean.py) against the plain-autograd reference, on one process and at TP 2.

Relative error throughout: max|a - b| / max|b| (a per-element rtol would be dominated by near-zero entries).
"""

import json

import pytest
import torch

from tests.dist import DIST_SCRIPTS, torchrun
from tests.numerics import rel
from tokenformer_dist.config import ConfigError, ModelConfig, load_config
from tokenformer_dist.model import TokenFormer
from tokenformer_dist.model.lean import lean_pattention
from tokenformer_dist.model.pattention import Pattention, reference_pattention, set_impl

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def run(fn, x, keys, values, grad, norm, **kw):
    x, keys, values = (t.detach().clone().requires_grad_() for t in (x, keys, values))
    y = fn(x, keys, values, torch.tensor(keys.shape[0] ** 0.5), norm, **kw)
    y.backward(grad)
    return y.detach(), x.grad, keys.grad, values.grad


def inputs(seed: int, n: int = 40, d_in: int = 24, d_out: int = 16, shape=(3, 7)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=gen)
    x[1, 2] = 0.0  # all-zero scores
    keys = torch.randn(n, d_in, generator=gen) * 0.3
    values = torch.randn(n, d_out, generator=gen) * 0.3
    return x, keys, values, torch.randn(*shape, d_out, generator=gen)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_matches_reference_fp32(norm, chunk):
    x, keys, values, grad = inputs(1)
    ref = run(reference_pattention, x, keys, values, grad, norm)
    lean = run(lean_pattention, x, keys, values, grad, norm, chunk_tokens=chunk)
    for name, a, b in zip(("out", "grad_x", "grad_keys", "grad_values"), lean, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= 1e-6, (name, rel(a, b))
    if norm != "softmax":  # all-zero scores: 0 output and 0 input gradient, as the reference
        assert (lean[0][1, 2] == 0).all() and (lean[1][1, 2] == 0).all()


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(norm):
    gen = torch.Generator().manual_seed(2)
    args = [torch.randn(*s, dtype=torch.float64, generator=gen, requires_grad=True)
            for s in ((2, 3, 6), (10, 6), (10, 5))]
    # several elementwise chunks (2 tokens each) are exercised too
    assert torch.autograd.gradcheck(lambda x, k, v: lean_pattention(x, k, v, 10**0.5, norm, chunk_tokens=2),
                                    args)


# bf16 lean vs bf16 reference, max over the three norms (seed 3), measured: the output and dV are the same bf16
# ops in the same order (0 difference); with the normalizers summed in bf16 instead of fp32 (lean.py's `acc`
# = the compute dtype) they differ by 3.6e-3 (softmax) to 1.2e-2. dX and dK differ by up to 8.2e-3 anyway
# (backward's bf16 ops run in another order): their tolerance cannot see that bug, the other two can.
BF16_TOL = {"out": 1e-3, "grad_x": 1.5e-2, "grad_keys": 1.5e-2, "grad_values": 1e-3}


@pytest.mark.parametrize("norm", NORMS)
def test_bf16_autocast_close_to_reference(norm):
    x, keys, values, grad = inputs(3, n=64, d_in=32, d_out=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = run(lean_pattention, x, keys, values, grad, norm)
        ref = run(reference_pattention, x, keys, values, grad, norm)
    assert lean[0].dtype == torch.bfloat16 and lean[1].dtype == lean[2].dtype == torch.float32
    for name, a, b in zip(BF16_TOL, lean, ref, strict=True):
        assert rel(a.float(), b.float()) <= BF16_TOL[name], (name, rel(a.float(), b.float()))


@pytest.mark.parametrize("norm", NORMS)
def test_bf16_normalizer_is_kept_in_fp32(norm):
    """By construction: the [tokens, 1] normalizer the lean Function keeps for backward is fp32 under bf16
    autocast (summed in bf16 it would be bf16), next to the bf16 [tokens, n] tensor."""
    x, keys, values, _ = inputs(3, n=64, d_in=32, d_out=32)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lean_pattention(x, keys.requires_grad_(), values.requires_grad_(), 8.0, norm)
    tokens = x.shape[0] * x.shape[1]
    assert {t.dtype for t in kept if t.shape == (tokens, 1)} == {torch.float32}
    assert {t.dtype for t in kept if t.shape == (tokens, 64)} == {torch.bfloat16}


def saved_bytes(fn, x, keys, values, norm) -> tuple[int, int]:
    """Bytes of unique storages autograd keeps for backward, without parameters: (with x, without x)."""
    storages: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in (keys, values)}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, keys, values, torch.tensor(16.0), norm)
    total = sum(storages.values())
    return total, total - storages.get(x.untyped_storage().data_ptr(), 0)


@pytest.mark.parametrize("norm", NORMS)
def test_keeps_one_tokens_by_n_tensor(norm):
    tokens, n, d = 64, 256, 32
    x = torch.randn(tokens, d, requires_grad=True)
    keys = torch.nn.Parameter(torch.randn(n, d) * 0.1)
    values = torch.nn.Parameter(torch.randn(n, d) * 0.1)
    unit = tokens * n * 4
    lean_all, lean_no_x = saved_bytes(lean_pattention, x, keys, values, norm)
    _, ref_no_x = saved_bytes(reference_pattention, x, keys, values, norm)
    assert lean_no_x <= unit + tokens * 4 + 64  # A (or P) plus the [tokens, 1] normalizer (and τ)
    assert lean_all - lean_no_x == tokens * d * 4
    assert ref_no_x >= 2 * unit


def test_impl_selection():
    assert ModelConfig().pattention_impl == "lean" and Pattention(8, 8, 16).impl == "lean"
    cfg = ModelConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2, seq_len=4, qkv_tokens=4, proj_tokens=4,
                      ffn_tokens=4, pattention_impl="reference")  # the config field reaches every Pattention
    layers = [m for m in TokenFormer(cfg).modules() if isinstance(m, Pattention)]
    assert len(layers) == 5 and all(m.impl == "reference" for m in layers)
    layer = Pattention(8, 8, 16)
    assert Pattention(8, 8, 16, impl="reference").impl == "reference"
    set_impl(torch.nn.Sequential(layer), "reference")
    assert layer.impl == "reference"
    with pytest.raises(ValueError, match="valid: lean, reference"):
        Pattention(8, 8, 16, impl="fast")
    bad = "^<defaults>: model.pattention_impl must be one of lean, reference, got 'fast'$"
    with pytest.raises(ConfigError, match=bad):
        load_config(None, ["model.pattention_impl=fast"])


def test_module_paths_agree():
    torch.manual_seed(0)
    lean, ref = Pattention(24, 16, 40, impl="lean"), Pattention(24, 16, 40, impl="reference")
    for m in (lean, ref):
        with torch.no_grad():
            m.key_tokens.copy_(torch.randn(40, 24, generator=torch.Generator().manual_seed(1)) * 0.3)
            m.value_tokens.copy_(torch.randn(40, 16, generator=torch.Generator().manual_seed(2)) * 0.3)
    x = torch.randn(2, 5, 24)
    for m in (lean, ref):
        m(x).square().sum().backward()
    assert rel(lean.key_tokens.grad, ref.key_tokens.grad) <= 1e-6
    assert rel(lean.value_tokens.grad, ref.value_tokens.grad) <= 1e-6


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("lean_tp")
    torchrun(DIST_SCRIPTS / "lean_pattention_tp.py", 2, str(out))
    return json.loads((out / "lean_tp.json").read_text())


def test_tp2_layer_matches_reference(tp2_results):
    layer = {k: v for k, v in tp2_results.items() if k.startswith("layer/")}
    assert len(layer) == 3 * 2 * 9
    for k, v in layer.items():
        if k.endswith("zero_rows_ok"):
            assert v == 1.0, k
        else:
            assert v <= 1e-6, (k, v)


def test_tp2_model_matches_reference(tp2_results):
    model = {k: v for k, v in tp2_results.items() if k.startswith("model/")}
    assert len(model) == 3 * 2 * 2
    for k, v in model.items():
        # whole model, two layers deep: rounding differences compound, so 1e-5 (fp32)
        assert v <= (1e-6 if k.endswith("loss") else 1e-5), (k, v)
