"""The work of one task: read a unit's documents, clean them, split train/val, tokenize."""

from __future__ import annotations

import array
import hashlib
import os
import time
from collections import Counter

import numpy as np

from data_prep.sources import clean_text, iter_unit_docs, utf8

_SP_CACHE: dict = {}

BATCH_BYTES = 256 * 1024  # texts handed to sentencepiece per call


def processor(model_bytes: bytes):
    import sentencepiece as spm

    key = hashlib.sha256(model_bytes).digest()
    sp = _SP_CACHE.get(key)
    if sp is None:
        _SP_CACHE.clear()
        sp = spm.SentencePieceProcessor(model_proto=model_bytes, num_threads=1)
        _SP_CACHE[key] = sp
    return sp


def is_val(text_bytes: bytes, threshold: int) -> bool:
    """Stable split: blake2b-64 of the cleaned document's UTF-8 bytes below fraction * 2**64."""
    h = int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8).digest(), "little")
    return h < threshold


def val_threshold(val_fraction: float) -> int:
    return min(1 << 64, int(round(val_fraction * (1 << 64))))


def process_unit(unit, model_bytes: bytes, cfg: dict) -> dict:
    """Return {'train_tokens', 'train_lens', 'val_tokens', 'val_lens', 'stats'} for one unit.

    Tokens are the documents in input order, each followed by the end-of-document id; lens are
    the per-document token counts (end-of-document included).
    """
    delay = float(os.environ.get("TFD_BUILD_UNIT_DELAY", "0") or 0)  # test hook: slow tasks down
    if delay:
        time.sleep(delay)
    cpu0 = time.process_time()
    sp = processor(model_bytes)
    if int(cfg["eod_id"]) != sp.eos_id():  # pragma: no cover - build.py passes the model's eos id
        raise ValueError(f"end-of-document id {cfg['eod_id']} is not the tokenizer's eos id {sp.eos_id()}")
    dtype = np.dtype(cfg["dtype"])
    threshold = val_threshold(float(cfg["val_fraction"]))
    stats: Counter = Counter()
    toks = {"train": array.array("I"), "val": array.array("I")}
    lens = {"train": array.array("q"), "val": array.array("q")}
    texts: list[str] = []
    splits: list[str] = []
    nbytes = 0

    def flush():
        ids = sp.encode(texts, num_threads=1, add_eos=True)
        for split, doc in zip(splits, ids, strict=True):
            toks[split].extend(doc)
            lens[split].append(len(doc))
        texts.clear()
        splits.clear()

    for raw in iter_unit_docs(unit, int(cfg["max_doc_bytes"]), stats):
        text = clean_text(raw, stats)
        if text is None:
            continue
        text, b = utf8(text, stats)
        split = "val" if threshold and is_val(b, threshold) else "train"
        stats["documents"] += 1
        stats["text_bytes"] += len(b)
        texts.append(text)
        splits.append(split)
        nbytes += len(b)
        if nbytes >= BATCH_BYTES:
            flush()
            nbytes = 0
    if texts:
        flush()
    out: dict = {"stats": dict(stats)}
    limit = np.iinfo(dtype).max
    for split in ("train", "val"):
        a = np.frombuffer(toks[split], dtype=np.uint32) if len(toks[split]) else np.zeros(0, np.uint32)
        if a.size and int(a.max()) > limit:  # never wrap silently
            raise ValueError(f"token id {int(a.max())} does not fit {dtype}")
        out[f"{split}_tokens"] = a.astype(dtype)
        out[f"{split}_lens"] = np.frombuffer(lens[split], dtype=np.int64).copy()
        stats_split = out["stats"]
        stats_split[f"{split}_documents"] = len(lens[split])
        stats_split[f"{split}_tokens"] = int(a.size)
    out["cpu_seconds"] = time.process_time() - cpu0  # not part of the (deterministic) stats
    return out
