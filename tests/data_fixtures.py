"""Small corpora in every input format of data_prep/build.py, built by the tests themselves."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import random
import tarfile
from pathlib import Path

import zstandard

WORDS = (
    "the of and to in is was for that on as with by he she it at from his her an were are which this be "
    "or has had not but they their one all been new more can will would about people time year when "
    "there who first also after city world into over government school only some then other two state "
    "model data training token tokens parameter attention layer network language text word sentence "
    "river mountain market village music history science history system number small large early late"
).split()


def make_docs(n: int = 240, seed: int = 0) -> list[str]:
    """Deterministic English-like documents with paragraphs (and some runs of blank lines)."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        paras = []
        for _ in range(rng.randint(1, 5)):
            sents = []
            for _ in range(rng.randint(1, 6)):
                w = [rng.choice(WORDS) for _ in range(rng.randint(4, 18))]
                sents.append(
                    " ".join(w).capitalize() + rng.choice(".!?") + (f" {d}" if rng.random() < 0.1 else "")
                )
            paras.append(" ".join(sents))
        sep = "\n\n\n\n" if d % 7 == 0 else "\n\n"
        docs.append(sep.join(paras) + ("\n\n\n" if d % 5 == 0 else ""))
    return docs


def write_txt_dir(d: Path, docs) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(docs):
        (d / f"{i:06d}.txt").write_text(t, encoding="utf-8")
    return d


def _jsonl_bytes(docs) -> bytes:
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)).encode()


def write_jsonl(p: Path, docs) -> Path:
    p.write_bytes(_jsonl_bytes(docs))
    return p


def write_jsonl_gz(p: Path, docs) -> Path:
    p.write_bytes(gzip.compress(_jsonl_bytes(docs), mtime=0))
    return p


def write_jsonl_zst(p: Path, docs) -> Path:
    p.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(docs)))
    return p


def write_parquet(p: Path, docs, row_group_size: int = 50) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": list(docs), "n": list(range(len(docs)))}), p, row_group_size=row_group_size
    )
    return p


def _tar_bytes(members, compress: str = "") -> bytes:
    """members: (name, bytes) or TarInfo-ready tuples (name, bytes, type, linkname)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            name, data = m[0], m[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            if len(m) > 2:
                ti.type = m[2]
                ti.linkname = m[3]
                tf.addfile(ti)
                continue
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    return lzma.compress(raw) if compress == "xz" else raw


def owt_inner(docs, start: int) -> bytes:
    """One urlsf_subset*.xz: an xz-compressed tar of .txt documents."""
    return _tar_bytes([(f"{start + i:07d}-{i}.txt", t.encode()) for i, t in enumerate(docs)], "xz")


def split_docs(docs, n_parts: int):
    k = -(-len(docs) // n_parts)
    return [docs[i : i + k] for i in range(0, len(docs), k)]


def write_owt_dir(d: Path, docs, n_files: int = 6) -> Path:
    """The extracted OpenWebText release: a directory of urlsf_subset*.xz."""
    d.mkdir(parents=True, exist_ok=True)
    start = 0
    for j, part in enumerate(split_docs(docs, n_files)):
        (d / f"urlsf_subset00-{j:03d}_data.xz").write_bytes(owt_inner(part, start))
        start += len(part)
    return d


def write_owt_tar_xz(p: Path, docs, n_inner: int = 6) -> Path:
    """openwebtext.tar.xz: an xz-compressed tar of xz-compressed tars of .txt (a tar.xz of xz-tars)."""
    members, start = [], 0
    for j, part in enumerate(split_docs(docs, n_inner)):
        members.append((f"openwebtext/urlsf_subset00-{j:03d}_data.xz", owt_inner(part, start)))
        start += len(part)
    p.write_bytes(_tar_bytes(members, "xz"))
    return p


def write_subsets_tar(d: Path, docs, n_tars: int = 2, inner_per_tar: int = 3) -> Path:
    """The Hugging Face layout: subsets/urlsf_subsetNN.tar holding urlsf_subset*.xz."""
    sub = d / "subsets"
    sub.mkdir(parents=True, exist_ok=True)
    start = 0
    for t, tar_docs in enumerate(split_docs(docs, n_tars)):
        members = []
        for j, part in enumerate(split_docs(tar_docs, inner_per_tar)):
            members.append((f"openwebtext/urlsf_subset{t:02d}-{j}_data.xz", owt_inner(part, start)))
            start += len(part)
        (sub / f"urlsf_subset{t:02d}.tar").write_bytes(_tar_bytes(members))
    return d


ALL_FORMATS = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "owt_dir", "owt_tar_xz", "subsets_tar")


def write_format(fmt: str, root: Path, docs) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return {
        "txt": lambda: write_txt_dir(root / "txt", docs),
        "jsonl": lambda: write_jsonl(root / "docs.jsonl", docs),
        "jsonl.gz": lambda: write_jsonl_gz(root / "docs.jsonl.gz", docs),
        "jsonl.zst": lambda: write_jsonl_zst(root / "docs.jsonl.zst", docs),
        "parquet": lambda: write_parquet(root / "docs.parquet", docs),
        "owt_dir": lambda: write_owt_dir(root / "openwebtext", docs),
        "owt_tar_xz": lambda: write_owt_tar_xz(root / "openwebtext.tar.xz", docs),
        "subsets_tar": lambda: write_subsets_tar(root / "hf", docs),
    }[fmt]()


def dataset_files(d: Path) -> dict[str, bytes]:
    """All files of a built dataset except manifest.json's run section (which may differ)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(d))
            data = p.read_bytes()
            if rel == "manifest.json":
                m = json.loads(data)
                m.pop("run", None)
                data = json.dumps(m, sort_keys=True).encode()
            out[rel] = data
    return out
