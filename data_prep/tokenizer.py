"""sentencepiece: a bounded, deterministic training sample, training, and loading a given model."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from data_prep.sources import DataError, Unit, clean_text, iter_unit_docs, utf8
from tokenformer_dist.atomic import atomic_write_bytes

# sentencepiece's unigram trainer gives different models for different thread counts; a fixed count
# keeps the tokenizer (and so every shard) identical on every machine and for every --workers.
TRAIN_THREADS = 4
MAX_SENTENCE_BYTES = 16384
MIN_BYTES_PER_UNIT = 256 * 1024


def collect_sample(
    units: Iterable[Unit], budget_bytes: int, est_units: int, max_doc_bytes: int, path: Path
) -> dict:
    """Write training sentences (non-empty lines of cleaned documents) to `path`, at most budget_bytes.

    Takes the first documents of every unit, up to budget/est_units bytes each (at least 256 KB), in
    unit order, until the budget is spent: deterministic and spread over the corpus when it is small
    enough to be listed cheaply.
    """
    per_unit = max(MIN_BYTES_PER_UNIT, budget_bytes // max(1, est_units))
    total = docs = sentences = skipped_long = 0
    stats: Counter = Counter()
    with open(path, "wb") as f:
        for unit in units:
            got = 0
            for raw in iter_unit_docs(unit, max_doc_bytes, stats):
                text = clean_text(raw, stats)
                if text is None:
                    continue
                text = utf8(text, stats)[0]
                docs += 1
                for line in text.split("\n"):
                    line = line.strip()
                    if not line:
                        continue
                    b = line.encode("utf-8")
                    if len(b) > MAX_SENTENCE_BYTES:
                        skipped_long += 1
                        continue
                    f.write(b + b"\n")
                    sentences += 1
                    got += len(b) + 1
                if got >= per_unit or total + got >= budget_bytes:
                    break
            total += got
            if total >= budget_bytes:
                break
    return {"bytes": total, "documents": docs, "sentences": sentences, "skipped_long_sentences": skipped_long}


def train(sample_path: Path, out_path: Path, vocab_size: int, model_type: str) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        with open(sample_path, "rb") as f:
            _train(spm, f, buf, vocab_size, model_type)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise DataError(f"sentencepiece training failed (vocab {vocab_size}, {model_type}): {msg}") from None
    atomic_write_bytes(out_path, _normalized(buf.getvalue()))


def _normalized(model: bytes) -> bytes:
    """Drop the training input's path from the model, so it does not depend on the output directory."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model)
    del m.trainer_spec.input[:]
    m.trainer_spec.ClearField("model_prefix")
    return m.SerializeToString(deterministic=True)


def _train(spm, f, buf, vocab_size, model_type):
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line.rstrip(b"\n").decode("utf-8") for line in f),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",  # keep the text as it is (newlines become byte tokens)
        remove_extra_whitespaces=False,
        split_digits=True,
        input_sentence_size=0,  # the sample is already bounded: use all of it, no random sampling
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=TRAIN_THREADS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )


def load(path: Path, expect_vocab: int | None = None) -> tuple[bytes, int, int]:
    """(model bytes, vocab size, end-of-document id) of a sentencepiece model; checks it."""
    import sentencepiece as spm

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read tokenizer {path}: {e.strerror}") from None
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception:
        raise DataError(f"not a sentencepiece model: {path}") from None
    vocab = sp.vocab_size()
    if expect_vocab is not None and vocab != expect_vocab:
        raise DataError(f"tokenizer {path} has vocabulary {vocab}, but --vocab-size is {expect_vocab}")
    eod = sp.eos_id()
    if eod < 0:
        raise DataError(f"tokenizer {path} has no end-of-sentence piece (</s>) to use as end-of-document")
    return data, vocab, eod
