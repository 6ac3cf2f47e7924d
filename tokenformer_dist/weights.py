"""The "sharded weights" format: model weights only, one safetensors file per tensor-parallel rank.

    DIR/manifest.json              {"format": "tokenformer-dist-weights", "tp": N, ...extra keys}
    DIR/config.yaml                resolved config of the model
    DIR/model_tp{rank:02d}.safetensors   rank's shard of every state_dict tensor (tau buffers included)

Written by the expansion tool, and by the trainer inside each checkpoint (fp32 master weights), so that
`--init-from`, evaluation and `checkpoint.iter_full_weights` read one format at any ZeRO stage.

Sharded axis: dim 0 of the TP-sharded tensors (`is_tp_sharded`): vocabulary rows of `embedding.weight`,
parameter-token rows of every `key_tokens` / `value_tokens`. Everything else is replicated on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from tokenformer_dist.config import Config
from tokenformer_dist.safetensors_stream import StreamingSafetensorsWriter
from tokenformer_dist.sharding import is_tp_sharded, shard_range

FORMAT = "tokenformer-dist-weights"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"


def rank_file(directory: str | Path, tp_rank: int) -> Path:
    return Path(directory) / f"model_tp{tp_rank:02d}.safetensors"


def is_weights_dir(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_manifest(path: str | Path) -> dict[str, Any]:
    manifest = Path(path) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{manifest}: cannot read a weights manifest ({e})") from None
    if data.get("format") != FORMAT or not isinstance(data.get("tp"), int):
        raise ValueError(f"{manifest}: not a {FORMAT} manifest "
                         f"(needs \"format\": \"{FORMAT}\" and integer \"tp\")")
    return data


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp name in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_rank_file(directory: str | Path, tp_rank: int, tensors: dict[str, torch.Tensor]) -> Path:
    """One rank's shard file (contiguous CPU copies), written under a temp name and renamed."""
    out = rank_file(directory, tp_rank)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out)
    return out


def write_sharded_weights(out_dir: str | Path, config: Config,
                          named_full_tensors: Iterable[tuple[str, torch.Tensor]], tp: int,
                          manifest_extra: dict[str, Any] | None = None) -> Path:
    """Write full (unsharded) tensors as a weights dir for `tp` ranks; `out_dir` appears only when complete.

    Memory: the tensors are referenced, not copied — each rank's shard is a row view written straight into
    that rank's file by the streaming writer the expansion tool uses (header first, then one tensor at a
    time). Peak memory is what the caller's tensors already take (e.g. a model's state_dict).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir}: output directory already exists; choose a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    writers: list[StreamingSafetensorsWriter] = []
    try:
        tensors = [(name, full.detach().to("cpu", torch.float32)) for name, full in named_full_tensors]
        for name, full in tensors:
            if is_tp_sharded(name) and full.shape[0] % tp:
                raise ValueError(f"{name}: {full.shape[0]} rows cannot be split over tp={tp}")

        def shard(name: str, full: torch.Tensor, r: int) -> torch.Tensor:
            return full[shard_range(full.shape[0], r, tp)] if is_tp_sharded(name) else full

        for r in range(tp):
            specs = [(name, tuple(shard(name, full, r).shape), torch.float32) for name, full in tensors]
            writers.append(StreamingSafetensorsWriter(rank_file(tmp, r), specs))
            for name, full in tensors:
                writers[r].write(name, shard(name, full, r))
            writers[r].close()
        (tmp / CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        manifest = {"format": FORMAT, "tp": tp, **(manifest_extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out_dir)
    except BaseException:
        for writer in writers:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _weights_source(path: Path) -> tuple[Path, int]:
    """(directory holding model_tpXX.safetensors, its TP) for a weights dir or a trainer checkpoint dir."""
    if is_weights_dir(path):
        return path, read_manifest(path)["tp"]
    meta = path / "meta.json"
    if meta.is_file():
        return path, int(json.loads(meta.read_text())["tp"])
    raise ValueError(f"{path}: neither a weights dir ({MANIFEST}) nor a trainer checkpoint (meta.json)")


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Fill `model` (a TokenFormer, parallelized or not) with this rank's shard from a weights dir or
    checkpoint dir.

    Both must be at the same TP; every state_dict entry (parameters and tau buffers) must be present and of
    the same shape. Only this rank's file is opened.
    """
    regions = getattr(model, "tp", None)  # the model's TP regions (model/mappings.py); none: one device
    tp, tp_rank = (regions.size, regions.rank) if regions is not None else (1, 0)
    src, src_tp = _weights_source(Path(path))
    if src_tp != tp:
        raise ValueError(f"{path}: weights were written for tp={src_tp} but this run uses tp={tp}; "
                         f"run at --tp {src_tp} or reshard the weights")
    fname = rank_file(src, tp_rank)
    if not fname.is_file():
        raise ValueError(f"{fname}: missing weights file for this tensor-parallel rank")
    state = model.state_dict()
    with safe_open(str(fname), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(state) - keys), sorted(keys - set(state))
        if missing or unexpected:
            raise ValueError(f"{fname}: weights do not match the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        for name, dst in state.items():
            t = f.get_tensor(name)
            if t.shape != dst.shape:
                raise ValueError(f"{fname}: {name} has shape {tuple(t.shape)}, "
                                 f"model expects {tuple(dst.shape)}")
            dst.copy_(t)
