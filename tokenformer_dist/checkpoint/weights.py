"""The "sharded weights" format: model weights only, one safetensors file per tensor-parallel rank.

    DIR/manifest.json              {"format": "tokenformer-dist-weights", "tp": N, ...extra keys}
    DIR/config.yaml                resolved config of the model
    DIR/model_tp{rank:02d}.safetensors   rank's shard of every state_dict tensor (tau buffers included)

Written by the expansion tool, and by the trainer inside each checkpoint (fp32 master weights, with
meta.json instead of manifest.json), so that `--init-from`, evaluation and `engine.iter_full_weights`
read one format at any ZeRO stage. Which tensors are split over the rank files, and on which dim, is the
sharding table (distributed/sharding.py); everything else is replicated in every rank file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenformer_dist.atomic import atomic_dir
from tokenformer_dist.checkpoint.safetensors_stream import StreamingSafetensorsWriter
from tokenformer_dist.config import Config, config_yaml
from tokenformer_dist.distributed.sharding import local_part

FORMAT = "tokenformer-dist-weights"
MANIFEST = "manifest.json"
META = "meta.json"  # a trainer checkpoint's metadata (engine.py), which also records its TP degree
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


def checkpoint_tp(path: str | Path) -> int:
    """The TP degree a weights dir (its manifest) or a trainer checkpoint dir (its meta.json) was written at."""
    path = Path(path)
    if is_weights_dir(path):
        return int(read_manifest(path)["tp"])
    if (path / META).is_file():
        return int(json.loads((path / META).read_text())["tp"])
    raise ValueError(f"{path}: neither a weights dir ({MANIFEST}) nor a trainer checkpoint ({META})")


def write_sharded_weights(out_dir: str | Path, config: Config,
                          named_full_tensors: Iterable[tuple[str, torch.Tensor]], tp: int,
                          manifest_extra: dict[str, Any] | None = None) -> Path:
    """Write full (unsharded) tensors as a weights dir for `tp` ranks; `out_dir` appears only when complete.

    Memory: the tensors are referenced, not copied — each rank's shard is a view written straight into
    that rank's file by the streaming writer the expansion tool uses (header first, then one tensor at a
    time). Peak memory is what the caller's tensors already take (e.g. a model's state_dict).
    """
    writers: list[StreamingSafetensorsWriter] = []
    try:
        with atomic_dir(out_dir) as tmp:
            tensors = [(name, full.detach().to("cpu", torch.float32)) for name, full in named_full_tensors]
            for name, full in tensors:
                local_part(name, full, 0, tp)  # a one-line error before anything is written
            for r in range(tp):
                parts = [(name, local_part(name, full, r, tp)) for name, full in tensors]
                writers.append(StreamingSafetensorsWriter(rank_file(tmp, r), [(n, tuple(t.shape), torch.float32)
                                                                              for n, t in parts]))
                for name, part in parts:
                    writers[r].write(name, part)
                writers[r].close()
            (tmp / CONFIG).write_text(config_yaml(config))
            manifest = {"format": FORMAT, "tp": tp, **(manifest_extra or {})}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return Path(out_dir)


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Fill `model` (a TokenFormer, parallelized or not) with this rank's shard from a weights dir or
    checkpoint dir.

    Both must be at the same TP; every state_dict entry (parameters and tau buffers) must be present and of
    the same shape. Only this rank's file is opened.
    """
    regions = getattr(model, "tp", None)  # the model's TP regions (model/mappings.py); none: one device
    tp, tp_rank = (regions.size, regions.rank) if regions is not None else (1, 0)
    src, src_tp = Path(path), checkpoint_tp(path)
    if src_tp != tp:
        raise ValueError(f"{path}: weights were written for tp={src_tp} but this run uses tp={tp}; "
                         f"load them at tp={src_tp}, or reshard them (expansion with unchanged token counts)")
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
