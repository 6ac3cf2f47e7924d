"""What the Pattention benchmarks compare (shared by bench_pattention.py and bench_memory.py).

lean       — the default eager training path (tokenformer_dist.model.lean, a torch.autograd.Function)
compiled   — the same under torch.compile (pattention.compiled_lean_pattention, what train.compile runs)
reference  — plain autograd through tokenformer_dist's normalize_scores (the tests' reference)
official   — the naive transcription of the official layer (tokenformer_dist.model.official)
mlp        — a same-shape Linear(d→n) → GeLU → Linear(n→d) without biases
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenformer_dist.model.lean import lean_pattention
from tokenformer_dist.model.official import official_pattention
from tokenformer_dist.model.pattention import pattention, reference_pattention


def make_variants(d: int, n: int, norm: str, seed: int = 0):
    """{name: (callable(x) -> y, parameters)} with the same shapes: d → n → d."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.nn.Parameter(torch.randn(n, d, generator=gen) * 0.02)
    values = torch.nn.Parameter(torch.randn(n, d, generator=gen) * 0.02)
    tau = torch.tensor(math.sqrt(n))
    w1 = torch.nn.Parameter(torch.randn(n, d, generator=gen) * 0.02)
    w2 = torch.nn.Parameter(torch.randn(d, n, generator=gen) * 0.02)
    return {
        "lean": (lambda x: lean_pattention(x, keys, values, tau, norm), (keys, values)),
        "compiled": (torch.compile(lambda x: pattention(x, keys, values, tau, norm), dynamic=False), (keys, values)),
        "reference": (lambda x: reference_pattention(x, keys, values, tau, norm), (keys, values)),
        "official": (lambda x: official_pattention(x, keys, values, norm), (keys, values)),
        "mlp": (lambda x: F.linear(F.gelu(F.linear(x, w1)), w2), (w1, w2)),
    }


def saved_bytes(fn, x: torch.Tensor, params) -> tuple[int, int]:
    """Bytes of the unique storages autograd keeps for backward of fn(x), parameters excluded.

    Returns (including x, excluding x): x is the layer input, which other consumers may keep anyway.
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}
    fn(x)  # a compiled variant compiles here: dynamo does not trace under saved-tensor hooks (it would run eager)

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    total = sum(storages.values())
    return total, total - storages.get(x.untyped_storage().data_ptr(), 0)
