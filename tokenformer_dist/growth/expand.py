"""Progressive scaling on disk: grow a checkpoint's parameter tokens and reshard it to another TP degree.

What grows, and the new rows' values, is tokens.py; which tensors are split over TP ranks is the sharding
table (distributed/sharding.py). Tensors are streamed one at a time (read, grown, split, written), so memory stays about
one full tensor; the output directory appears only when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from tokenformer_dist.atomic import atomic_dir
from tokenformer_dist.checkpoint.engine import (
    checkpoint_tp,
    iter_weight_blocks,
    read_config,
    resolve_checkpoint,
    weight_specs,
)
from tokenformer_dist.checkpoint.safetensors_stream import StreamingSafetensorsWriter
from tokenformer_dist.checkpoint.weights import CONFIG, FORMAT, MANIFEST, rank_file
from tokenformer_dist.config import Config, config_yaml, validate
from tokenformer_dist.distributed.sharding import is_tp_sharded, local_shape, shard_range
from tokenformer_dist.growth.optimizer import check_source, expand_optimizer_state
from tokenformer_dist.growth.tokens import Growth

T = TypeVar("T")


def rows_of(blocks: list[torch.Tensor], rows: slice) -> list[torch.Tensor]:
    """Rows [rows.start, rows.stop) of the concatenation of `blocks`, as views into the blocks (no copy)."""
    pieces, offset = [], 0
    for block in blocks:
        lo, hi = max(rows.start, offset), min(rows.stop, offset + block.shape[0])
        if lo < hi:
            pieces.append(block[lo - offset:hi - offset])
        offset += block.shape[0]
    return pieces


def expand_checkpoint(src: str | Path, dst: str | Path, tp: int, target: Config, init: str = "exact",
                      seed: int = 0, progress: bool = True, keep_optimizer: bool = False) -> dict[str, Any]:
    """Write `dst`: the weights of `src` grown to `target`'s token counts, sharded for `tp` ranks (with
    `keep_optimizer`, also a resumable universal checkpoint carrying the Adam moments; optimizer.py).

    `dst` appears only when complete (written to a temporary directory next to it, then renamed).
    Returns the manifest written with it.
    """
    src_dir = resolve_checkpoint(src)
    src_cfg = read_config(src_dir)
    target = dataclasses.replace(target, parallel=dataclasses.replace(target.parallel, tp=tp))
    growth = Growth.between(src_cfg, target, init, seed)
    validate(target)
    if keep_optimizer:
        check_source(src_dir)  # fail before writing anything
    try:
        specs = [(name, growth.shape(name, shape)) for name, shape in weight_specs(src_dir)]
        rank_specs = [(name, local_shape(name, shape, tp), torch.float32) for name, shape in specs]
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{rank_file(src_dir, 0)}: unreadable checkpoint weights ({e})") from None

    writers: list[StreamingSafetensorsWriter] = []
    checksum = hashlib.sha256()
    try:
        with atomic_dir(dst) as tmp:
            writers = [StreamingSafetensorsWriter(rank_file(tmp, r), rank_specs) for r in range(tp)]
            total = sum(torch.Size(s).numel() * 4 for _, s in specs)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"expand → tp {tp}", disable=not progress)
            try:
                def read_and_grow() -> Iterator[tuple[str, list[torch.Tensor]]]:
                    for name, blocks in iter_weight_blocks(src_dir):
                        checksum.update(name.encode())
                        for block in blocks:
                            checksum.update(memoryview(block.float().contiguous().numpy()).cast("B"))
                        yield name, [b.float() for b in growth.grow(name, blocks)]

                for name, grown in prefetch(read_and_grow()):
                    sharded = is_tp_sharded(name)
                    n_rows = sum(b.shape[0] for b in grown) if grown[0].ndim else 0
                    for r, writer in enumerate(writers):
                        writer.write(name, rows_of(grown, shard_range(n_rows, r, tp)) if sharded else grown[0])
                    bar.update(sum(b.numel() for b in grown) * 4)
            except (SafetensorError, RuntimeError) as e:
                raise ValueError(f"{src_dir}: missing or truncated checkpoint shard ({str(e).splitlines()[0]})") \
                    from None
            finally:
                bar.close()
            for writer in writers:
                writer.close()
            manifest = {
                "format": FORMAT, "tp": tp, "source": str(src_dir.resolve()), "source_tp": checkpoint_tp(src_dir),
                "source_checksum": f"sha256:{checksum.hexdigest()}", "old_tokens": growth.old,
                "new_tokens": growth.new, "init": init, "seed": seed,
                "function_preserving": init == "exact" or growth.old == growth.new,
                "optimizer_state": keep_optimizer,
            }
            if keep_optimizer:
                expand_optimizer_state(src_dir, tmp, growth, target, tp)
            (tmp / CONFIG).write_text(config_yaml(target))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return manifest
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Produce `items` in a background thread, up to `depth` ahead, so that reading, hashing and drawing new
    rows overlap with writing (torch, hashlib and file I/O release the GIL). Errors surface in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():  # a consumer that stopped early must not leave the worker blocked
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer
            put((done, e))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()
