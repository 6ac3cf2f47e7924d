"""Input formats: detection, planning into work units, and document iteration.

A *unit* is the work of one Ray task: a list of *pieces* (a whole small file, a byte range of a
plain JSONL file, some row groups of a parquet file, some members of an uncompressed tar, or
members already read out of a compressed outer tar by the driver). Units are cut from the inputs
by a fixed byte budget, so the list of units -- and therefore the output -- depends only on the
inputs and the arguments, never on the number of workers.

Nothing is ever extracted to disk: tars are read as streams, member by member.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard


class DataError(Exception):
    """A problem with the inputs or the output directory; printed as one line, exit status 2."""


# Members of a compressed outer tar (openwebtext.tar.xz) are counted at this many text bytes per
# compressed byte when cutting units; plain text counts 1:1.
COMPRESSION_ESTIMATE = 4

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED = (
    "openwebtext.tar.xz (a tar of xz-compressed tars of .txt), directories of urlsf_subset*.xz, "
    "subsets/*.tar, .jsonl/.jsonl.gz/.jsonl.zst with a 'text' field, .parquet with a 'text' column, "
    "directories of .txt files"
)


# --------------------------------------------------------------------------------------------- #
# Cleanup (as the Hugging Face openwebtext loader did) and counting
# --------------------------------------------------------------------------------------------- #

_NL3 = re.compile("\n\n\n+")


def clean_text(raw: bytes | str, stats: Counter) -> str | None:
    """Return the cleaned document, or None when it is dropped (the reason is counted in stats)."""
    stats["documents_seen"] += 1
    if isinstance(raw, bytes):
        if b"\x00" in raw:
            stats["dropped_nul"] += 1
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            stats["invalid_utf8_replaced"] += 1
    else:
        text = raw
        if "\x00" in text:
            stats["dropped_nul"] += 1
            return None
    text = _NL3.sub("\n\n", text).strip()
    if not text:
        stats["dropped_empty"] += 1
        return None
    return text


def utf8(text: str, stats: Counter) -> tuple[str, bytes]:
    """(text, its UTF-8 bytes); lone surrogates (from JSON escapes) are replaced and counted."""
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:
        b = text.encode("utf-8", errors="replace")
        stats["invalid_utf8_replaced"] += 1
        return b.decode("utf-8"), b


# --------------------------------------------------------------------------------------------- #
# Units
# --------------------------------------------------------------------------------------------- #


@dataclass
class Unit:
    key: str  # "<input index>-<unit index>", zero-padded: sorting keys gives the output order
    pieces: list = field(default_factory=list)  # tuples, see iter_piece_docs
    nbytes: int = 0  # input bytes on disk that this unit accounts for (progress bar)
    est: int = 0  # estimated text bytes (unit cutting)


def _is_unsafe_member(name: str) -> bool:
    p = name.replace("\\", "/")
    return p.startswith("/") or ".." in p.split("/") or (len(p) > 1 and p[1] == ":")


def _member_ok(m: tarfile.TarInfo, stats: Counter) -> bool:
    """Regular file with a safe path? Other members are skipped and counted (never extracted)."""
    if m.isdir():
        return False
    if m.issym() or m.islnk():
        stats["skipped_tar_links"] += 1
        return False
    if not m.isfile():
        stats["skipped_tar_special"] += 1
        return False
    if _is_unsafe_member(m.name):
        stats["skipped_tar_unsafe_paths"] += 1
        return False
    return True


def _member_kind(name: str) -> str | None:
    n = name.lower()
    if n.endswith(".txt"):
        return "txt"
    if n.endswith(".xz"):
        return "xztar"
    return None


def detect_file(path: Path) -> str | None:
    """Format of one file from its name: txt, jsonl, jsonl.gz, jsonl.zst, parquet, tar, xztar, gztar."""
    n = path.name.lower()
    if n.endswith(TEXT_SUFFIXES):
        return "txt"
    if n.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if n.endswith((".jsonl.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if n.endswith((".jsonl.zst", ".jsonl.zstd", ".ndjson.zst")):
        return "jsonl.zst"
    if n.endswith(".parquet"):
        return "parquet"
    if n.endswith(".tar"):
        return "tar"
    if n.endswith((".xz", ".txz")):
        return "xztar"
    if n.endswith((".tar.gz", ".tgz")):
        return "gztar"
    return None


def _open_compressed_tar_stream(fileobj, fmt: str) -> tarfile.TarFile:
    return tarfile.open(fileobj=fileobj, mode="r|xz" if fmt == "xztar" else "r|gz")


def _archive_error(where: str, e: BaseException) -> DataError:
    return DataError(f"corrupt or truncated archive {where}: {type(e).__name__}: {e}")


_ARCHIVE_ERRORS = (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error, gzip.BadGzipFile, OSError)


def _outer_tar_holds_tars(path: Path, fmt: str) -> bool:
    """Peek at the first regular member: does this compressed tar hold .xz tars (openwebtext.tar.xz)?"""
    try:
        with open(path, "rb") as f, _open_compressed_tar_stream(f, fmt) as tf:
            for m in tf:
                if m.isfile():
                    return _member_kind(m.name) == "xztar"
    except _ARCHIVE_ERRORS as e:
        raise _archive_error(str(path), e) from None
    return False


def list_input_files(inp: Path, stats: Counter) -> list[tuple[Path, str]]:
    """The (file, format) list of one --input, in a fixed order (sorted paths)."""
    if not inp.exists():
        raise DataError(f"input not found: {inp}")
    if inp.is_file():
        fmt = detect_file(inp)
        if fmt is None:
            raise DataError(f"unknown input format: {inp} (supported: {SUPPORTED})")
        return [(inp, fmt)]
    if not inp.is_dir():
        raise DataError(f"input is neither a file nor a directory: {inp}")
    out = []
    for dirpath, dirnames, filenames in os.walk(inp, followlinks=False):
        keep = []
        for d in sorted(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                stats["skipped_symlinks"] += 1
            elif not d.startswith("."):
                keep.append(d)
        dirnames[:] = keep
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if fn.startswith("."):
                continue
            if p.is_symlink():
                stats["skipped_symlinks"] += 1
                continue
            fmt = detect_file(p)
            if fmt is None:
                stats["skipped_unknown_files"] += 1
                continue
            out.append((p, fmt))
    out.sort(key=lambda t: str(t[0]))
    if not out:
        raise DataError(f"no input files of a supported format in {inp} (supported: {SUPPORTED})")
    return out


def _est(fmt: str, size: int) -> int:
    return size if fmt in ("txt", "jsonl", "tar") else size * COMPRESSION_ESTIMATE


def plan_input(idx: int, inp: Path, block_bytes: int, max_doc_bytes: int, stats: Counter) -> Iterator[Unit]:
    """Units of one --input, lazily (a compressed outer tar is read while the build runs)."""
    files = list_input_files(inp, stats)
    pending = Unit(key="")
    n = 0

    def new_key() -> str:
        nonlocal n
        n += 1
        return f"{idx:03d}-{n - 1:07d}"

    def flush():
        nonlocal pending
        if pending.pieces:
            pending.key = new_key()
            yield pending
        pending = Unit(key="")

    def add(piece, nbytes, est):
        pending.pieces.append(piece)
        pending.nbytes += nbytes
        pending.est += est
        if pending.est >= block_bytes:
            yield from flush()

    for path, fmt in files:
        size = path.stat().st_size
        if fmt == "jsonl" and size > block_bytes:
            yield from flush()
            for start in range(0, size, block_bytes):
                end = min(size, start + block_bytes)
                yield Unit(new_key(), [("jsonl_range", str(path), start, end)], end - start, end - start)
        elif fmt == "parquet":
            yield from flush()
            yield from _plan_parquet(path, block_bytes, new_key)
        elif fmt == "tar":
            yield from flush()
            yield from _plan_tar(path, block_bytes, max_doc_bytes, new_key, stats)
        elif (
            fmt in ("xztar", "gztar")
            and size > block_bytes // COMPRESSION_ESTIMATE
            and _outer_tar_holds_tars(path, fmt)
        ):
            yield from flush()
            yield from _plan_stream(path, fmt, block_bytes, max_doc_bytes, new_key, stats)
        else:
            yield from add((fmt, str(path)), size, _est(fmt, size))
    yield from flush()


def _plan_parquet(path: Path, block_bytes: int, new_key) -> Iterator[Unit]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"cannot read parquet {path}: {type(e).__name__}: {e}") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"parquet {path} has no 'text' column (columns: {', '.join(names)})")
    md = pf.metadata
    groups, est = [], 0
    size = path.stat().st_size
    for i in range(md.num_row_groups):
        groups.append(i)
        est += md.row_group(i).total_byte_size
        if est >= block_bytes:
            yield Unit(
                new_key(),
                [("parquet", str(path), tuple(groups))],
                size * len(groups) // max(1, md.num_row_groups),
                est,
            )
            groups, est = [], 0
    if groups:
        yield Unit(
            new_key(),
            [("parquet", str(path), tuple(groups))],
            size * len(groups) // max(1, md.num_row_groups),
            est,
        )


def _wanted_member(m: tarfile.TarInfo, max_doc_bytes: int, stats: Counter) -> str | None:
    """The member's kind if it is to be read; None (counted in `stats`) for unsafe, other or too-long ones."""
    if not _member_ok(m, stats):
        return None
    kind = _member_kind(m.name)
    if kind is None:
        stats["skipped_tar_other_members"] += 1
        return None
    if kind == "txt" and m.size > max_doc_bytes:
        stats["dropped_too_long"] += 1
        stats["documents_seen"] += 1
        return None
    return kind


def _plan_tar(path: Path, block_bytes: int, max_doc_bytes: int, new_key, stats: Counter) -> Iterator[Unit]:
    """An uncompressed tar (the Hugging Face subsets/*.tar): members located by offset, read by seek."""
    members, est = [], 0
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                kind = _wanted_member(m, max_doc_bytes, stats)
                if kind is None:
                    continue
                members.append((m.name, m.offset_data, m.size, kind))
                est += _est(kind, m.size)
                if est >= block_bytes:
                    yield Unit(
                        new_key(),
                        [("tar_members", str(path), tuple(members))],
                        sum(x[2] for x in members),
                        est,
                    )
                    members, est = [], 0
    except _ARCHIVE_ERRORS as e:
        raise _archive_error(str(path), e) from None
    if members:
        yield Unit(new_key(), [("tar_members", str(path), tuple(members))], sum(x[2] for x in members), est)


class _CountingReader(io.RawIOBase):
    def __init__(self, f):
        self.f, self.pos = f, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.pos += n or 0
        return n


def _plan_stream(path: Path, fmt: str, block_bytes: int, max_doc_bytes: int, new_key, stats: Counter):
    """openwebtext.tar.xz: the driver streams the outer tar once and hands members to the tasks."""
    pieces, est, last_pos = [], 0, 0
    where = str(path)
    try:
        with open(path, "rb", buffering=0) as raw:
            cr = _CountingReader(raw)
            with _open_compressed_tar_stream(io.BufferedReader(cr, 1 << 20), fmt) as tf:
                for m in tf:
                    where = f"{path}[{m.name}]"
                    kind = _wanted_member(m, max_doc_bytes, stats)
                    if kind is None:
                        continue
                    data = tf.extractfile(m).read()
                    if len(data) != m.size:
                        raise EOFError(f"member {m.name} truncated")
                    pieces.append(("blob", m.name, kind, data))
                    est += _est(kind, m.size)
                    if est >= block_bytes:
                        yield Unit(new_key(), pieces, cr.pos - last_pos, est)
                        pieces, est, last_pos = [], 0, cr.pos
                if pieces:
                    yield Unit(new_key(), pieces, cr.pos - last_pos, est)
    except _ARCHIVE_ERRORS as e:
        raise _archive_error(where, e) from None


# --------------------------------------------------------------------------------------------- #
# Reading documents out of a unit (runs in the Ray tasks)
# --------------------------------------------------------------------------------------------- #


def iter_unit_docs(unit: Unit, max_doc_bytes: int, stats: Counter) -> Iterator[bytes | str]:
    for piece in unit.pieces:
        yield from _iter_piece(piece, max_doc_bytes, stats)


def _iter_piece(piece: tuple, max_doc_bytes: int, stats: Counter) -> Iterator[bytes | str]:
    kind = piece[0]
    if kind == "txt":
        p = piece[1]
        if os.path.getsize(p) > max_doc_bytes:
            stats["dropped_too_long"] += 1
            stats["documents_seen"] += 1
            return
        with open(p, "rb") as f:
            yield f.read()
    elif kind == "jsonl":
        with open(piece[1], "rb") as f:
            yield from _jsonl_lines(f, piece[1], max_doc_bytes, stats)
    elif kind == "jsonl_range":
        yield from _jsonl_range(piece[1], piece[2], piece[3], max_doc_bytes, stats)
    elif kind == "jsonl.gz":
        try:
            with gzip.open(piece[1], "rb") as f:
                yield from _jsonl_lines(f, piece[1], max_doc_bytes, stats)
        except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
            raise DataError(f"corrupt or truncated gzip {piece[1]}: {type(e).__name__}: {e}") from None
    elif kind == "jsonl.zst":
        yield from _jsonl_lines(_zstd_lines(piece[1]), piece[1], max_doc_bytes, stats)
    elif kind == "parquet":
        yield from _parquet_docs(piece[1], piece[2], max_doc_bytes, stats)
    elif kind in ("xztar", "gztar"):
        try:
            with open(piece[1], "rb") as f:
                yield from _tar_stream_docs(f, kind, piece[1], max_doc_bytes, stats, depth=0)
        except _ARCHIVE_ERRORS as e:
            raise _archive_error(piece[1], e) from None
    elif kind == "tar_members":
        yield from _tar_members(piece[1], piece[2], max_doc_bytes, stats)
    elif kind == "blob":
        _, name, mkind, data = piece
        yield from _blob_docs(name, mkind, data, max_doc_bytes, stats, where=name)
    else:  # pragma: no cover
        raise DataError(f"internal: unknown piece kind {kind}")


def _blob_docs(name, mkind, data: bytes, max_doc_bytes, stats, where) -> Iterator[bytes]:
    if mkind == "txt":
        if len(data) > max_doc_bytes:
            stats["dropped_too_long"] += 1
            stats["documents_seen"] += 1
            return
        yield data
    else:
        try:
            yield from _tar_stream_docs(io.BytesIO(data), "xztar", where, max_doc_bytes, stats, depth=1)
        except _ARCHIVE_ERRORS as e:
            raise _archive_error(where, e) from None


def _tar_stream_docs(fileobj, fmt, where, max_doc_bytes, stats, depth) -> Iterator[bytes]:
    with _open_compressed_tar_stream(fileobj, fmt) as tf:
        for m in tf:
            if not _member_ok(m, stats):
                continue
            kind = _member_kind(m.name)
            if kind is None or (kind == "xztar" and depth >= 1):
                stats["skipped_tar_other_members"] += 1
                continue
            if kind == "txt" and m.size > max_doc_bytes:
                stats["dropped_too_long"] += 1
                stats["documents_seen"] += 1
                continue
            data = tf.extractfile(m).read()
            if len(data) != m.size:
                raise EOFError(f"member {m.name} truncated")
            yield from _blob_docs(m.name, kind, data, max_doc_bytes, stats, where=f"{where}[{m.name}]")


def _tar_members(path, members, max_doc_bytes, stats) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for name, offset, size, kind in members:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise DataError(f"corrupt or truncated archive {path}: member {name} is cut short")
            yield from _blob_docs(name, kind, data, max_doc_bytes, stats, where=f"{path}[{name}]")


def _zstd_lines(path) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    rest = b""
    try:
        with open(path, "rb") as f:
            dobj = dctx.decompressobj()
            fed = False
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                while chunk:
                    fed = True
                    out = dobj.decompress(chunk)
                    chunk = b""
                    if dobj.eof:
                        chunk = dobj.unused_data
                        dobj = dctx.decompressobj()
                        fed = False
                    if out:
                        lines = (rest + out).split(b"\n")
                        rest = lines.pop()
                        for ln in lines:
                            yield ln + b"\n"
            if fed:
                raise EOFError("zstd stream ends inside a frame")
    except (zstandard.ZstdError, EOFError) as e:
        raise DataError(f"corrupt or truncated zstd {path}: {e}") from None
    if rest:
        yield rest


def _json_text(line: bytes, where: str, max_doc_bytes: int, stats: Counter):
    if len(line) > max_doc_bytes + 64:  # not parsed: a huge line is dropped (and counted) as it is
        stats["dropped_too_long"] += 1
        stats["documents_seen"] += 1
        return None
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"invalid JSON at {where}: {e}") from None
    if not isinstance(obj, dict) or "text" not in obj:
        raise DataError(f"no 'text' field at {where}")
    t = obj["text"]
    if not isinstance(t, str):
        raise DataError(f"'text' is not a string at {where}")
    return t


def _jsonl_lines(f, path, max_doc_bytes, stats) -> Iterator[str]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        t = _json_text(line, f"{path}:{lineno}", max_doc_bytes, stats)
        if t is not None:
            yield t


def _jsonl_range(path, start, end, max_doc_bytes, stats) -> Iterator[str]:
    """Lines that START in [start, end) -- so adjacent ranges split a file exactly once."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line that started before `start`
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                t = _json_text(line, f"{path} (byte {pos})", max_doc_bytes, stats)
                if t is not None:
                    yield t
            pos += len(line)


def _parquet_docs(path, groups, max_doc_bytes, stats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        for g in groups:
            col = pf.read_row_group(g, columns=["text"]).column("text")
            for t in col.to_pylist():
                if t is None:
                    stats["documents_seen"] += 1
                    stats["dropped_empty"] += 1
                    continue
                if len(t) > max_doc_bytes:  # characters <= bytes: a cheap first test
                    stats["dropped_too_long"] += 1
                    stats["documents_seen"] += 1
                    continue
                yield t
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read parquet {path}: {type(e).__name__}: {e}") from None
