"""Progressive scaling: grow a checkpoint's parameter tokens and reshard it to another TP degree.

Exact growth (default). For every Pattention with n_old → n_new tokens:
    new key rows   = 0            → their scores are 0, GeLU(0) = 0 and ‖A‖₂ is unchanged,
    new value rows ~ N(0, value_std) (random, so the new key rows receive gradient at once, as in LoRA),
    τ              = kept          (the official code's τ = √n would rescale every old activation).
The grown model computes exactly the old function (l2_norm_gelu and gelu_l2_norm; softmax gives exp(0) = 1
to a zero key and is therefore not exact — refused in exact mode).
Official growth (`init="official"`): new key rows ~ N(0, init_std), τ = √n_new, as Haiyang-W/TokenFormer's
`custom_load_fn_incremental`; this changes the function.

New rows are drawn per (seed, parameter name), so the result does not depend on the source or target TP.
Tensors are streamed one at a time (read, grown, split, written), so memory stays about one full tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from tokenformer_dist.checkpoint import checkpoint_tp, iter_weight_blocks, read_config, resolve_checkpoint
from tokenformer_dist.config import Config, ConfigError, validate
from tokenformer_dist.model.init import master_normal, value_init_std
from tokenformer_dist.safetensors_stream import StreamingSafetensorsWriter
from tokenformer_dist.sharding import is_tp_sharded, shard_range
from tokenformer_dist.weights import CONFIG, FORMAT, MANIFEST, rank_file

T = TypeVar("T")
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


def parse_tokens(spec: str) -> dict[str, int]:
    """`qkv=N,proj=N,ffn=N` → counts (every kind required)."""
    counts: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in KINDS or not value.strip().isdigit():
            raise ConfigError(f"--tokens {spec!r}: expected qkv=N,proj=N,ffn=N with positive integers")
        counts[key] = int(value)
    if set(counts) != set(KINDS):
        raise ConfigError(f"--tokens {spec!r}: give all of qkv=N,proj=N,ffn=N")
    return counts


def grown_counts(counts: dict[str, int], factor: float, tp: int) -> dict[str, int]:
    """Multiply every count by `factor`, rounded up to a multiple of the TP degree."""
    if not factor >= 1.0:
        raise ConfigError(f"--grow {factor}: must be >= 1 (fewer tokens than the source is not growth)")
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
                          f"softmax weight exp(0)); use --init official")


@dataclass(frozen=True)
class Growth:
    """How each tensor of the source grows into the target."""

    old: dict[str, int]
    new: dict[str, int]
    init: str
    seed: int
    key_std: float
    value_std: float

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


def rows_of(blocks: list[torch.Tensor], rows: slice) -> list[torch.Tensor]:
    """Rows [rows.start, rows.stop) of the concatenation of `blocks`, as views into the blocks (no copy)."""
    pieces, offset = [], 0
    for block in blocks:
        lo, hi = max(rows.start, offset), min(rows.stop, offset + block.shape[0])
        if lo < hi:
            pieces.append(block[lo - offset:hi - offset])
        offset += block.shape[0]
    return pieces


def check_rank_files(ckpt_dir: Path, tp: int) -> None:
    """A one-line error naming the file when a rank's weights file is missing, truncated or not safetensors."""
    for r in range(tp):
        path = rank_file(ckpt_dir, r)
        if not path.is_file():
            raise ValueError(f"{path}: missing checkpoint shard (the checkpoint was written at tp={tp})")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_len)) if 0 < header_len < size else None
        except (struct.error, ValueError):
            header = None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file, or its header is truncated")
        end = 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                                   default=0)
        if size < end:
            raise ValueError(f"{path}: truncated checkpoint shard ({size} of {end} bytes)")


def full_specs(ckpt_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of every weight in a checkpoint, read from the safetensors headers only."""
    tp = checkpoint_tp(ckpt_dir)
    check_rank_files(ckpt_dir, tp)
    specs = []
    with safe_open(str(rank_file(ckpt_dir, 0)), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            shape = tuple(f.get_slice(name).get_shape())
            if is_tp_sharded(name):
                shape = (shape[0] * tp, *shape[1:])
            specs.append((name, shape))
    return specs


def expand_checkpoint(src: str | Path, dst: str | Path, tp: int, target: Config, init: str = "exact",
                      seed: int = 0, progress: bool = True, keep_optimizer: bool = False) -> dict[str, Any]:
    """Write `dst`: the weights of `src` grown to `target`'s token counts, sharded for `tp` ranks (with
    `keep_optimizer`, also a resumable universal checkpoint carrying the Adam moments; expand_optimizer.py).

    `dst` appears only when complete (written to a temporary directory next to it, then renamed).
    Returns the manifest written with it.
    """
    if init not in INIT_MODES:
        raise ConfigError(f"--init {init!r}: valid: {', '.join(INIT_MODES)}")
    dst = Path(dst)
    if dst.exists():
        raise ConfigError(f"--out {dst}: already exists; choose a new path (nothing is overwritten)")
    src_dir = resolve_checkpoint(src)
    src_cfg = read_config(src_dir)
    target = dataclasses.replace(target, parallel=dataclasses.replace(target.parallel, tp=tp))
    check_target(src_cfg, target, init)
    validate(target)
    if keep_optimizer:
        from tokenformer_dist.expand_optimizer import check_source

        check_source(src_dir)  # fail before writing anything
    m = src_cfg.model
    growth = Growth(token_counts(src_cfg), token_counts(target), init, seed, m.init_std,
                    value_init_std(m.n_layers, m.d_model))
    try:
        specs = [(name, growth.shape(name, shape)) for name, shape in full_specs(src_dir)]
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{rank_file(src_dir, 0)}: unreadable checkpoint weights ({e})") from None

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    writers: list[StreamingSafetensorsWriter] = []
    checksum = hashlib.sha256()
    try:
        for r in range(tp):
            rank_specs = [(name, _shard_shape(name, shape, tp), torch.float32) for name, shape in specs]
            writers.append(StreamingSafetensorsWriter(rank_file(tmp, r), rank_specs))
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
                n_rows = sum(b.shape[0] for b in grown) if grown[0].ndim else 0
                for r, writer in enumerate(writers):
                    writer.write(name, rows_of(grown, shard_range(n_rows, r, tp)) if is_tp_sharded(name) else grown[0])
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
            from tokenformer_dist.expand_optimizer import expand_optimizer_state

            expand_optimizer_state(src_dir, tmp, growth, target, tp)
        (tmp / CONFIG).write_text(yaml.safe_dump(target.to_dict(), sort_keys=False))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, dst)
        return manifest
    except BaseException:
        for writer in writers:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
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


def _shard_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    if not is_tp_sharded(name):
        return shape
    if shape[0] % tp:
        raise ConfigError(f"{name}: {shape[0]} rows cannot be split over --tp {tp}")
    return (shape[0] // tp, *shape[1:])
