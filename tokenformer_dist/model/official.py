"""A direct transcription of the official TokenFormer layer's arithmetic (Haiyang-W/TokenFormer,
`nonlinear_normalization`, as FACTS §1 states it): τ = √n of the CURRENT token count and no epsilon.

Never used for training: it is the oracle the tests compare `pattention` against and the "naive official
layer" the Pattention benchmarks time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def official_pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, norm: str) -> torch.Tensor:
    scores = x @ keys.t()
    n = scores.shape[-1]
    if norm == "l2_norm_gelu":
        weights = F.gelu(scores / torch.norm(scores, p=2, dim=-1, keepdim=True) * math.sqrt(n))
    elif norm == "gelu_l2_norm":
        act = F.gelu(scores)
        weights = act / torch.norm(act, p=2, dim=-1, keepdim=True) * math.sqrt(n)
    elif norm == "softmax":
        exp = torch.exp(scores)
        weights = exp / torch.norm(exp, p=1, dim=-1, keepdim=True) * n
    else:
        raise ValueError(f"unknown normalization {norm!r}")
    return weights @ values
