"""Growth: which parameter tokens a checkpoint gains, and the values of the new rows.

Shared by the weights expansion (expand.py), the optimizer-state expansion (optimizer.py) and the
expansion CLI (cli.py). Pure math on names, shapes and tensors: no files.

Exact growth (default). For every Pattention with n_old → n_new tokens:
    new key rows   = 0            → their scores are 0, GeLU(0) = 0 and ‖A‖₂ is unchanged,
    new value rows ~ N(0, value_std) (random, so the new key rows receive gradient at once, as in LoRA),
    τ              = kept          (the official code's τ = √n would rescale every old activation).
The grown model computes exactly the old function (l2_norm_gelu and gelu_l2_norm; softmax gives exp(0) = 1
to a zero key and is therefore not exact — refused in exact mode).
Official growth (`init="official"`): new key rows ~ N(0, init_std), τ = √n_new, as Haiyang-W/TokenFormer's
`custom_load_fn_incremental`; this changes the function.

New rows are drawn per (seed, parameter name), so the result does not depend on the source or target TP.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from tokenformer_dist.config import Config, ConfigError
from tokenformer_dist.model.init import master_normal, value_init_std

KINDS = ("qkv", "proj", "ffn")
INIT_MODES = ("exact", "official")
_TOKEN_TENSOR = re.compile(r"^blocks\.\d+\.(?:attn\.(?P<attn>query|key|value|proj)|ffn)\."
                           r"(?P<field>key_tokens|value_tokens|tau)$")


def token_kind(name: str) -> tuple[str, str] | None:
    """('qkv' | 'proj' | 'ffn', 'key_tokens' | 'value_tokens' | 'tau') for a Pattention tensor, else None."""
    m = _TOKEN_TENSOR.match(name)
    if m is None:
        return None
    attn = m.group("attn")
    return ("ffn" if attn is None else "proj" if attn == "proj" else "qkv"), m.group("field")


def token_counts(cfg: Config) -> dict[str, int]:
    return {"qkv": cfg.model.qkv_tokens, "proj": cfg.model.proj_tokens, "ffn": cfg.model.ffn_tokens}


def with_counts(cfg: Config, counts: dict[str, int], tp: int, source: str) -> Config:
    model = dataclasses.replace(cfg.model, qkv_tokens=counts["qkv"], proj_tokens=counts["proj"],
                                ffn_tokens=counts["ffn"])
    return dataclasses.replace(cfg, model=model, parallel=dataclasses.replace(cfg.parallel, tp=tp), source=source)


def grown_counts(counts: dict[str, int], factor: float, tp: int) -> dict[str, int]:
    """Multiply every count by `factor`, rounded up to a multiple of the TP degree."""
    if not factor >= 1.0:
        raise ConfigError(f"growth factor must be >= 1 (fewer tokens than the source is not growth), got {factor}")
    return {k: math.ceil(n * factor / tp) * tp for k, n in counts.items()}


def check_target(src: Config, dst: Config, init: str) -> None:
    """One-line errors for a target the source cannot grow into."""
    for key in ("d_model", "n_layers", "n_heads", "vocab_size", "seq_len", "norm"):
        a, b = getattr(src.model, key), getattr(dst.model, key)
        if a != b:
            raise ConfigError(f"{dst.source}: model.{key}={b} differs from the checkpoint's {a}; expansion only "
                              f"adds parameter tokens (same d_model, n_layers, n_heads, vocab_size, seq_len, norm)")
    old, new = token_counts(src), token_counts(dst)
    for k in KINDS:
        if new[k] < old[k]:
            raise ConfigError(f"{dst.source}: {k}_tokens={new[k]} is fewer than the checkpoint's {old[k]}; "
                              f"removing parameter tokens is refused")
    if init == "exact" and src.model.norm == "softmax" and new != old:
        raise ConfigError(f"{src.source}: model.norm=softmax cannot grow exactly (a zero key still gets "
                          f"softmax weight exp(0)); use init 'official'")


@dataclass(frozen=True)
class Growth:
    """How each tensor of the source grows into the target."""

    old: dict[str, int]
    new: dict[str, int]
    init: str
    seed: int
    key_std: float
    value_std: float

    @classmethod
    def between(cls, src: Config, target: Config, init: str, seed: int) -> Growth:
        """The growth of `src` into `target`'s token counts (checked: see `check_target`)."""
        if init not in INIT_MODES:
            raise ConfigError(f"init {init!r}: valid: {', '.join(INIT_MODES)}")
        check_target(src, target, init)
        m = src.model
        return cls(token_counts(src), token_counts(target), init, seed, m.init_std,
                   value_init_std(m.n_layers, m.d_model))

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        kind = token_kind(name)
        if kind is None or kind[1] == "tau":
            return shape
        return (self.new[kind[0]], *shape[1:])

    def grow(self, name: str, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The grown tensor as row blocks: the source's blocks (untouched) plus one block of new rows."""
        kind = token_kind(name)
        if kind is None:
            return blocks
        k, field = kind
        n_old, n_new = self.old[k], self.new[k]
        if field == "tau":
            return blocks if self.init == "exact" else [torch.tensor(math.sqrt(n_new), dtype=torch.float32)]
        if sum(b.shape[0] for b in blocks) != n_old:
            raise ValueError(f"{name}: has {sum(b.shape[0] for b in blocks)} tokens but the checkpoint's config "
                             f"says {n_old}")
        if n_new == n_old:
            return blocks
        extra = (n_new - n_old, blocks[0].shape[1])
        if field == "key_tokens" and self.init == "exact":
            rows = torch.zeros((), dtype=blocks[0].dtype).expand(extra)  # no memory; written as a file hole
        else:
            std = self.key_std if field == "key_tokens" else self.value_std
            rows = master_normal(f"{name}.grow{n_old}to{n_new}", extra, std, self.seed)
        return [*blocks, rows.to(blocks[0].dtype)]
