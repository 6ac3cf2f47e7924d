"""The sharding table: which state_dict tensors are split over tensor-parallel ranks, on which dim, and how.

    name pattern                      dim   kind
    embedding.weight                  0     vocab     vocabulary rows (the output layer is tied to it)
    *.key_tokens, *.value_tokens      0     tokens    parameter-token rows of every Pattention
    anything else                     -     replicated (final LayerNorm, the τ buffers)

A sharded tensor is split along its dim into contiguous, equal blocks: rank r owns [r·n/tp, (r+1)·n/tp).
Every consumer reads this table — the model's TP attributes and master init (model/tensor_parallel.py,
model/tokenformer.py), the weights format and checkpoint reader (checkpoint/weights.py, checkpoint/engine.py),
DeepSpeed's universal-checkpoint patterns and per-parameter restore metadata, growth and resharding (growth/expand.py,
growth/optimizer.py). Kept free of megatron-core so that light tools import it quickly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ShardRule:
    pattern: str  # regular expression, matched against the whole state_dict name
    dim: int | None  # the dim split over TP ranks; None: replicated on every rank
    kind: str  # "vocab" | "tokens" | "replicated"


RULES: tuple[ShardRule, ...] = (
    ShardRule(r"embedding\.weight", 0, "vocab"),
    ShardRule(r".*\.(?:key_tokens|value_tokens)", 0, "tokens"),
)
REPLICATED = ShardRule(r".*", None, "replicated")
# Every sharded tensor is split along its rows: DeepSpeed's universal conversion merges TP slices along dim 0
# only, and the streaming writers (expansion, HF export) write a tensor as its row blocks one after another.
ROWS = 0
if any(rule.dim != ROWS for rule in RULES):
    raise AssertionError("sharding.RULES: every sharded tensor must be split along dim 0 (ROWS)")
_COMPILED = tuple((re.compile(rule.pattern), rule) for rule in RULES)


def rule_for(name: str) -> ShardRule:
    """The table's rule for state_dict tensor `name` (REPLICATED when no sharded pattern matches)."""
    for regex, rule in _COMPILED:
        if regex.fullmatch(name):
            return rule
    return REPLICATED


def is_tp_sharded(name: str) -> bool:
    """Whether state_dict tensor `name` is split over TP ranks (along `rule_for(name).dim`)."""
    return rule_for(name).dim is not None


def shard_range(n: int, rank: int, size: int) -> slice:
    """The contiguous rows [rank*n/size, (rank+1)*n/size) of an n-row tensor that `rank` owns."""
    if n % size:
        raise ValueError(f"{n} rows cannot be split evenly over {size} tensor-parallel ranks")
    per = n // size
    return slice(rank * per, (rank + 1) * per)


def local_part(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of the full tensor `name` (a view; the whole tensor when replicated)."""
    dim = rule_for(name).dim
    if dim is None:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"{name}: {full.shape[dim]} rows cannot be split over tp={size}")
    return full.narrow(dim, shard_range(full.shape[dim], rank, size).start, full.shape[dim] // size)


def local_shape(name: str, full_shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The shape of one rank's part of tensor `name` whose full shape is `full_shape`."""
    dim = rule_for(name).dim
    if dim is None:
        return tuple(full_shape)
    if full_shape[dim] % size:
        raise ValueError(f"{name}: {full_shape[dim]} rows cannot be split over tp={size}")
    return tuple(n // size if i == dim else n for i, n in enumerate(full_shape))


def full_shape(name: str, part_shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The full shape of tensor `name` from one rank's part of it."""
    dim = rule_for(name).dim
    return tuple(part_shape) if dim is None else tuple(n * size if i == dim else n for i, n in enumerate(part_shape))


def join_parts(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every rank's part in rank order (a replicated tensor: rank 0's copy)."""
    dim = rule_for(name).dim
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def universal_checkpoint_info(vocab_size: int) -> dict[str, Any]:
    """What deepspeed.checkpoint.ds_to_universal needs to merge TP slices, derived from the table.

    DeepSpeed concatenates a slice along dim 0 unless a pattern says otherwise, which is every sharded
    rule's dim; "replicated" is every name that no sharded rule matches; the vocabulary rule is named.
    """
    sharded = "|".join(rule.pattern for rule in RULES)
    return {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": [rf"^(?!(?:{sharded})$).*$"],
        "vocabulary_parameter_patterns": [rf"^{rule.pattern}$" for rule in RULES if rule.kind == "vocab"],
        "original_vocab_size": vocab_size,
        "padded_vocab_size": vocab_size,
    }


def universal_restore_meta(name: str, part_shape: tuple[int, ...], size: int) -> dict[str, Any]:
    """Which block of a universal checkpoint's full tensor `name` this TP rank loads, in the form DeepSpeed
    reads from a parameter's `ds_autotp_universal_checkpoint_meta` attribute (checkpoint.engine.mark_universal_restore).

    DeepSpeed 0.19.8's ZeRO-3 universal load cuts a TP shard out of the full tensor only by this metadata
    (runtime/zero/stage3.py `load_hp_checkpoint_state` -> checkpoint/universal_checkpoint.py
    `_resolve_autotp_partition`); without it every rank copies the whole tensor into its shard and fails.
    ZeRO 1/2 read it too and cut the same block (chunk `size` ways along the table's dim).
    """
    dim = rule_for(name).dim
    if dim is None:
        return {"replicated": True, "partition_dim": None}
    return {"partition_dim": dim, "logical_shape": full_shape(name, part_shape, size)}
