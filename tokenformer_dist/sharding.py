"""The sharding rules, in one place: which tensors are split over tensor-parallel ranks, and how.

Sharded tensors are split along dim 0 into contiguous, equal blocks: vocabulary rows of `embedding.weight`
and parameter-token rows of every `key_tokens` / `value_tokens`. Everything else (final LayerNorm, the τ
buffers) is replicated. Kept free of megatron-core so that light tools import it quickly.
"""

from __future__ import annotations

import re

_SHARDED = re.compile(r"^(embedding\.weight|.*\.key_tokens|.*\.value_tokens)$")


def is_tp_sharded(name: str) -> bool:
    """Whether state_dict tensor `name` is split over TP ranks (along dim 0)."""
    return bool(_SHARDED.match(name))


def shard_range(n: int, rank: int, size: int) -> slice:
    """The contiguous rows [rank*n/size, (rank+1)*n/size) of an n-row tensor that `rank` owns."""
    if n % size:
        raise ValueError(f"{n} rows cannot be split evenly over {size} tensor-parallel ranks")
    per = n // size
    return slice(rank * per, (rank + 1) * per)
