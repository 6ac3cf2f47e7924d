"""Write safetensors files one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once. Converting a 1.4B checkpoint on a
machine with less RAM than the checkpoint must not, so this writer lays out the header from the tensors'
names and shapes first (safetensors puts all offsets in the header) and then writes each tensor's bytes at
its offset as it arrives. The files are standard safetensors: `safetensors.safe_open` reads them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32"}


class StreamingSafetensorsWriter:
    """Write the tensors named in `specs` ([(name, shape, dtype)]) to `path`.

    Call `write(name, tensor)` once per spec, in any order (each lands at its offset from the header);
    `close()` checks that every tensor arrived.
    """

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
        offset = 0
        for name, shape, dtype in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (tuple(shape), dtype, offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self._data_start = 8 + len(raw)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 (closed in close() / abort())
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        # Sized up front: bytes never written read back as zeros, so an all-zero block costs no write.
        self._file.truncate(self._data_start + offset)
        self._written: set[str] = set()

    def write(self, name: str, pieces: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Write tensor `name`, given whole or as row blocks that concatenate (dim 0) to it — written one
        after another, so a shard that spans two source blocks needs no concatenated copy. A block that is a
        broadcast zero (`torch.zeros(()).expand(...)`, all strides 0) is skipped: the file already reads 0."""
        if name not in self._layout or name in self._written:
            raise ValueError(f"{self.path}: {name} is not expected in this file, or was written twice")
        shape, dtype, offset = self._layout[name]
        pieces = [pieces] if isinstance(pieces, torch.Tensor) else list(pieces)
        got = (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]) if pieces[0].ndim else ()
        if got != shape or any(p.dtype != dtype for p in pieces):
            raise ValueError(f"{self.path}: {name} expected {shape} {dtype}, got {got} {pieces[0].dtype}")
        position = self._data_start + offset
        for piece in pieces:
            nbytes = piece.numel() * piece.element_size()
            if piece.numel() and all(st == 0 for st in piece.stride()) and piece[(0,) * piece.ndim] == 0:
                position += nbytes
                continue
            self._file.seek(position)
            position += nbytes
            t = piece.detach().to("cpu").contiguous()
            if dtype == torch.bfloat16:  # numpy has no bfloat16: write the same bytes as int16
                t = t.view(torch.int16)
            self._file.write(memoryview(t.numpy()).cast("B"))  # no extra copy of the tensor
        self._written.add(name)

    def close(self) -> None:
        missing = [name for name in self._layout if name not in self._written]
        if missing:
            self._file.close()
            raise ValueError(f"{self.path}: {len(missing)} tensors were never written, e.g. {missing[0]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
