"""Parts (one finished unit each) and the final zarr v3 arrays.

Each finished unit is one `.npz` part, written to a temporary name and renamed: a part exists only
once complete, which is what makes `--resume` safe after a kill at any moment. When all parts exist
they are concatenated, in unit order, into per-split zarr arrays assembled in a temporary directory
and renamed into place; `manifest.json` is written last and marks the dataset complete.

Token arrays are zarr v3 with no compressor and no filter: every chunk file `<array>/c/<i>` is raw
little-endian bytes (zarr stores edge chunks full size, padded with the fill value 0), so the
training loader memory-maps them (tokenformer_dist/data.py) while zarr can still open them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CHUNK_TOKENS = 1 << 24  # 32 MiB per uint16 chunk file
SPLITS = ("train", "val")
BUILD_DIR = ".build"  # an unfinished build's scratch directory inside the output; removed once complete


def build_dir(out: Path) -> Path:
    """The scratch directory of a build into `out` (state.json, the tokenizer sample, parts, Ray's temp dir)."""
    return out / BUILD_DIR


def parts_dir(out: Path) -> Path:
    """Where a build into `out` keeps its finished units (one `.npz` part each)."""
    return build_dir(out) / "parts"


def part_path(parts_dir: Path, key: str) -> Path:
    return parts_dir / f"{key}.npz"


def write_part(parts_dir: Path, key: str, result: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=parts_dir, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                train_tokens=np.asarray(result["train_tokens"]),
                train_lens=np.asarray(result["train_lens"]),
                val_tokens=np.asarray(result["val_tokens"]),
                val_lens=np.asarray(result["val_lens"]),
                stats=np.frombuffer(json.dumps(result["stats"], sort_keys=True).encode(), dtype=np.uint8),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, part_path(parts_dir, key))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_part_stats(parts_dir: Path, key: str) -> dict:
    with np.load(part_path(parts_dir, key)) as z:
        return json.loads(z["stats"].tobytes())


class RawArrayWriter:
    """Streams a 1-D array into a zarr v3 array whose chunk files are raw little-endian bytes."""

    def __init__(self, path: Path, length: int, dtype, chunk: int):
        import zarr

        self.path, self.dtype = Path(path), np.dtype(dtype).newbyteorder("<")
        self.chunk = max(1, min(chunk, length))
        zarr.create_array(
            store=str(self.path),
            shape=(length,),
            chunks=(self.chunk,),
            dtype=np.dtype(dtype).name,
            compressors=None,
            filters=None,
            fill_value=0,
            zarr_format=3,
            overwrite=True,
        )
        (self.path / "c").mkdir(exist_ok=True)
        self.length = length
        self.buf = np.zeros(self.chunk, self.dtype)
        self.fill = 0
        self.index = 0
        self.written = 0

    def append(self, a: np.ndarray) -> None:
        a = np.asarray(a)
        pos = 0
        while pos < a.size:
            n = min(self.chunk - self.fill, a.size - pos)
            self.buf[self.fill : self.fill + n] = a[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == self.chunk:
                self._flush()

    def _flush(self) -> None:
        self.buf[self.fill :] = 0
        with open(self.path / "c" / str(self.index), "wb") as f:
            f.write(self.buf.tobytes())
        self.written += self.fill
        self.index += 1
        self.fill = 0

    def close(self) -> None:
        if self.fill:
            self._flush()
        if self.written != self.length:  # pragma: no cover - internal consistency
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.length} elements")


def assemble_split(parts_dir: Path, keys: list[str], split: str, dest: Path, work: Path, dtype) -> dict:
    """Concatenate the split's tokens of all parts (in key order) into dest/{tokens,doc_offsets}."""
    if (dest / "zarr.json").exists():  # renamed into place only when complete (earlier, killed run)
        return json.loads((dest / "zarr.json").read_text())["attributes"]
    import zarr

    n_tok = n_doc = 0
    for k in keys:
        with np.load(part_path(parts_dir, k)) as z:
            n_tok += int(z[f"{split}_tokens"].shape[0])
            n_doc += int(z[f"{split}_lens"].shape[0])
    tmp = work / f"assemble-{split}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tokens = RawArrayWriter(tmp / "tokens", n_tok, dtype, CHUNK_TOKENS)
    offsets = RawArrayWriter(tmp / "doc_offsets", n_doc + 1, np.int64, CHUNK_TOKENS)
    offsets.append(np.zeros(1, np.int64))
    base = 0
    for k in keys:
        with np.load(part_path(parts_dir, k)) as z:
            tokens.append(z[f"{split}_tokens"])
            lens = z[f"{split}_lens"]
            if lens.size:
                offsets.append(base + np.cumsum(lens))
                base += int(lens.sum())
    tokens.close()
    offsets.close()
    attrs = {"documents": n_doc, "tokens": n_tok, "chunk_tokens": tokens.chunk}
    zarr.create_group(store=str(tmp), attributes=attrs, zarr_format=3, overwrite=False)
    for root, _, files in os.walk(tmp):
        for fn in files:
            with open(os.path.join(root, fn), "rb+") as f:
                os.fsync(f.fileno())
    os.replace(tmp, dest)
    return attrs
