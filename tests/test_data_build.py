"""data_prep/build.py: formats, determinism across worker counts (real Ray), resume, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.build import main
from tests.data_fixtures import (
    ALL_FORMATS,
    _tar_bytes,
    dataset_files,
    make_docs,
    owt_inner,
    write_format,
    write_jsonl,
    write_owt_tar_xz,
    write_txt_dir,
)
from tokenformer_dist.data import DatasetError, TokenShards

REPO = Path(__file__).resolve().parent.parent
BUILD = [sys.executable, str(REPO / "data_prep" / "build.py")]
VOCAB = 400
DOCS = make_docs(240)


def build(*args) -> int:
    return main([str(a) for a in args] + ["--no-progress"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """A tokenizer trained once on the fixture corpus (in-process build, no Ray)."""
    d = tmp_path_factory.mktemp("tok")
    src = write_jsonl(d / "docs.jsonl", DOCS)
    assert build("--input", src, "--output", d / "out", "--vocab-size", VOCAB, "--workers", 0) == 0
    return d / "out" / "tokenizer.model"


@pytest.fixture(scope="module")
def owt(tmp_path_factory) -> dict:
    """openwebtext.tar.xz fixture + a reference build (Ray, 2 workers) shared by several tests."""
    d = tmp_path_factory.mktemp("owt")
    src = write_owt_tar_xz(d / "openwebtext.tar.xz", DOCS, n_inner=8)
    extra = write_jsonl(d / "more.jsonl", make_docs(60, seed=1))
    args = ["--input", src, extra, "--vocab-size", VOCAB, "--block-mb", 0.01, "--val-fraction", 0.1]
    ref = d / "ref"
    assert build(*args, "--output", ref, "--workers", 2) == 0
    return {"dir": d, "args": args, "ref": ref}


def _tokens(d: Path, split="train") -> np.ndarray:
    s = TokenShards(d, split)
    return s.tokens(0, s.n_tokens)


# ------------------------------------------------------------------------------------------- #


def test_all_formats_give_the_same_tokens(tmp_path, tok):
    ref = None
    for fmt in ALL_FORMATS:
        src = write_format(fmt, tmp_path / "src" / fmt, DOCS)
        out = tmp_path / f"out-{fmt}"
        assert (
            build(
                "--input",
                src,
                "--output",
                out,
                "--tokenizer",
                tok,
                "--workers",
                0,
                "--block-mb",
                0.02,
                "--val-fraction",
                0.1,
            )
            == 0
        ), fmt
        man = json.loads((out / "manifest.json").read_text())
        got = (_tokens(out, "train"), _tokens(out, "val"), man["splits"])
        assert man["counts"]["documents"] == len(DOCS), fmt
        assert man["splits"]["val"]["documents"] > 0 and man["splits"]["train"]["documents"] > 0
        if ref is None:
            ref = got
            # documents are concatenated with the end-of-document id, offsets point at their starts
            s = TokenShards(out)
            offs = s.doc_offsets()
            assert (
                offs[0] == 0
                and offs[-1] == s.n_tokens
                and len(offs) == man["splits"]["train"]["documents"] + 1
            )
            assert (got[0][offs[1:] - 1] == s.eod_id).all()
            # cleanup as the HF loader: no runs of 3+ newlines, no leading/trailing whitespace
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
            text = sp.decode(got[0][: offs[1] - 1].tolist())
            assert "\n\n\n" not in text and text == text.strip()
            assert text in [t.replace("\n\n\n\n", "\n\n").strip() for t in DOCS]
        else:
            assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), fmt
            assert got[2] == ref[2], fmt


def test_zarr_can_open_the_shards(owt):
    import zarr

    g = zarr.open_group(str(owt["ref"]), mode="r")
    assert g.attrs["vocab_size"] == VOCAB
    t = g["train/tokens"]
    assert t.dtype == np.uint16 and t.shape[0] == TokenShards(owt["ref"]).n_tokens
    assert np.array_equal(t[:], _tokens(owt["ref"]))
    man = json.loads((owt["ref"] / "manifest.json").read_text())
    for key in ("vocab_size", "eod_id", "dtype", "splits", "inputs", "arguments", "counts"):
        assert key in man
    assert man["units"] > 8  # several tasks: members of the outer tar.xz + ranges of the jsonl
    assert (owt["ref"] / "tokenizer.model").exists() and not (owt["ref"] / ".build").exists()


def test_deterministic_across_worker_counts(owt, tmp_path):
    ref = dataset_files(owt["ref"])
    for workers in (1, 0):  # one Ray worker, and no Ray at all
        out = tmp_path / f"w{workers}"
        assert build(*owt["args"], "--output", out, "--workers", workers) == 0
        assert dataset_files(out) == ref, workers


def test_resume_after_kill(owt, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, TFD_BUILD_UNIT_DELAY="0.4")
    cmd = BUILD + [str(a) for a in owt["args"]] + ["--output", str(out), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    parts = out / ".build" / "parts"
    deadline = time.time() + 90
    try:
        while time.time() < deadline and not list(parts.glob("*.npz")):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    done = len(list(parts.glob("*.npz")))
    assert done >= 1
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetError, match="unfinished build"):
        TokenShards(out)
    # a rerun without --resume refuses to touch it
    assert build(*owt["args"], "--output", out, "--workers", 2) == 2
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "were already done and were not redone" in r.stderr
    assert dataset_files(out) == dataset_files(owt["ref"])
    # --resume on a complete dataset: nothing to do
    assert build(*owt["args"], "--output", out, "--workers", 0, "--resume") == 0


@pytest.mark.parametrize("stage", ["after-tokenizer", "after-parts", "after-train"])
def test_resume_after_kill_at_later_stages(owt, tmp_path, stage):
    out = tmp_path / stage
    cmd = BUILD + [str(a) for a in owt["args"]] + ["--output", str(out), "--workers", "0", "--no-progress"]
    r = subprocess.run(cmd, env=dict(os.environ, TFD_BUILD_CRASH_AT=stage), capture_output=True, timeout=300)
    assert r.returncode == 137
    assert not (out / "manifest.json").exists()
    assert build(*owt["args"], "--output", out, "--workers", 0, "--resume") == 0
    assert dataset_files(out) == dataset_files(owt["ref"])


def test_resume_with_other_arguments_is_refused(owt, tmp_path, capsys):
    out = tmp_path / "o"
    r = subprocess.run(
        BUILD + [str(a) for a in owt["args"]] + ["--output", str(out), "--workers", "0"],
        env=dict(os.environ, TFD_BUILD_CRASH_AT="after-parts"),
        capture_output=True,
        timeout=300,
    )
    assert r.returncode == 137
    args = list(owt["args"])
    args[args.index("--val-fraction") + 1] = 0.2
    assert build(*args, "--output", out, "--workers", 0, "--resume") == 2
    assert "other inputs or arguments" in capsys.readouterr().err


def test_cli_sample_dataset(tmp_path):
    """No --input: a sample from the installed packages' docstrings (kept tiny here)."""
    out = tmp_path / "data" / "sample"
    r = subprocess.run(
        BUILD
        + [
            "--output",
            str(out),
            "--sample-mb",
            "0.3",
            "--vocab-size",
            "1000",
            "--workers",
            "0",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "SAMPLE" in r.stderr and "openwebtext" in r.stderr.lower()
    s = TokenShards(out)
    assert s.vocab_size == 1000 and s.n_tokens > 10_000
    # a second run (e.g. the demo run twice) keeps the existing sample
    assert build("--output", out) == 0


# ------------------------------------------------------------------------------------------- #
# bad inputs
# ------------------------------------------------------------------------------------------- #


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_bad_archives_are_errors(tmp_path, tok, capsys):
    good = owt_inner(DOCS[:20], 0)
    cases = {
        "random.xz": os.urandom(5000),
        "truncated.xz": good[: len(good) // 2],
    }
    outer = _tar_bytes([("openwebtext/a.xz", good), ("openwebtext/b.xz", owt_inner(DOCS[20:60], 20))], "xz")
    cases["openwebtext.tar.xz"] = outer[: len(outer) * 2 // 3]  # a truncated outer tar.xz
    plain = _tar_bytes([("a.xz", good), ("b.xz", good)])
    cases["truncated.tar"] = plain[: len(plain) // 2]
    for name, data in cases.items():
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_bytes(data)
        out = tmp_path / ("out_" + name)
        rc = build(
            "--input", d / name, "--output", out, "--tokenizer", tok, "--workers", 0, "--block-mb", 0.01
        )
        msg = _err(capsys)
        assert rc == 2 and "corrupt or truncated" in msg and name in msg, (name, msg)
        assert not (out / "manifest.json").exists()


def test_unsafe_tar_members_links_nul_and_utf8_are_skipped_and_counted(tmp_path, tok):
    members = [
        ("ok/0.txt", DOCS[0].encode()),
        ("/abs/1.txt", DOCS[1].encode()),
        ("../up/2.txt", DOCS[2].encode()),
        ("ok/link.txt", b"", tarfile.SYMTYPE, "/etc/passwd"),
        ("ok/hard.txt", b"", tarfile.LNKTYPE, "ok/0.txt"),
        ("ok/nul.txt", b"binary\x00data"),
        ("ok/bad-utf8.txt", b"caf\xe9 au lait " + DOCS[3].encode()),
        ("ok/empty.txt", b" \n\n  "),
        ("ok/readme.md", b"not a document"),
    ]
    import lzma

    d = tmp_path / "in"
    d.mkdir()
    (d / "urlsf_subset00-1_data.xz").write_bytes(lzma.compress(_tar_bytes(members)))
    (d / "notes.csv").write_text("a,b\n")  # unknown files in a directory are skipped and counted
    os.symlink(d / "urlsf_subset00-1_data.xz", d / "urlsf_subset00-2_data.xz")
    out = tmp_path / "out"
    assert build("--input", d, "--output", out, "--tokenizer", tok, "--workers", 0) == 0
    c = json.loads((out / "manifest.json").read_text())["counts"]
    assert c["documents"] == 2
    assert c["skipped_tar_unsafe_paths"] == 2 and c["skipped_tar_links"] == 2
    assert c["dropped_nul"] == 1 and c["invalid_utf8_replaced"] == 1 and c["dropped_empty"] == 1
    assert (
        c["skipped_tar_other_members"] == 1 and c["skipped_unknown_files"] == 1 and c["skipped_symlinks"] == 1
    )


def test_huge_document_is_skipped_and_counted(tmp_path, tok):
    d = write_txt_dir(tmp_path / "txt", DOCS[:30])
    with open(d / "000999.txt", "wb") as f:  # one 100 MB document
        line = b"word " * 20 + b"\n"
        f.write(line * (100 * 1024 * 1024 // len(line) + 1))
    j = tmp_path / "big.jsonl"
    j.write_text(json.dumps({"text": "x " * 700_000}) + "\n" + json.dumps({"text": DOCS[40]}) + "\n")
    out = tmp_path / "out"
    assert build("--input", d, j, "--output", out, "--tokenizer", tok, "--workers", 0, "--max-doc-mb", 1) == 0
    c = json.loads((out / "manifest.json").read_text())["counts"]
    assert c["dropped_too_long"] == 2 and c["documents"] == 31


@pytest.mark.parametrize(
    "setup, expect",
    [
        ("empty_dir", "no input files"),
        ("empty_file", "no documents"),
        ("unknown", "unknown input format"),
        ("missing", "input not found"),
        ("no_text_field", "no 'text' field"),
        ("bad_json", "invalid JSON"),
        ("truncated_zst", "corrupt or truncated zstd"),
        ("truncated_gz", "corrupt or truncated gzip"),
        ("parquet_no_text", "no 'text' column"),
        ("vocab_mismatch", "has vocabulary 400, but --vocab-size is 512"),
        ("not_a_tokenizer", "not a sentencepiece model"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, tok, capsys, setup, expect):
    import gzip

    import zstandard

    src = tmp_path / "src"
    src.mkdir()
    extra = []
    tokenizer = tok
    if setup == "empty_dir":
        inp = src
    elif setup == "empty_file":
        inp = src / "e.jsonl"
        inp.write_text("")
    elif setup == "unknown":
        inp = src / "data.csv"
        inp.write_text("text\nhello\n")
    elif setup == "missing":
        inp = src / "nope.jsonl"
    elif setup == "no_text_field":
        inp = src / "a.jsonl"
        inp.write_text('{"content": "hi"}\n')
    elif setup == "bad_json":
        inp = src / "a.jsonl"
        inp.write_text('{"text": "hi"}\n{"text": "unterminated\n')
    elif setup == "truncated_zst":
        inp = src / "a.jsonl.zst"
        data = zstandard.ZstdCompressor().compress(
            ("".join(json.dumps({"text": t}) + "\n" for t in DOCS)).encode()
        )
        inp.write_bytes(data[: len(data) // 2])
    elif setup == "truncated_gz":
        inp = src / "a.jsonl.gz"
        data = gzip.compress(("".join(json.dumps({"text": t}) + "\n" for t in DOCS)).encode())
        inp.write_bytes(data[: len(data) // 2])
    elif setup == "parquet_no_text":
        import pyarrow as pa
        import pyarrow.parquet as pq

        inp = src / "a.parquet"
        pq.write_table(pa.table({"body": ["x"]}), inp)
    elif setup == "vocab_mismatch":
        inp = write_jsonl(src / "a.jsonl", DOCS[:10])
        extra = ["--vocab-size", 512]
    elif setup == "not_a_tokenizer":
        inp = write_jsonl(src / "a.jsonl", DOCS[:10])
        tokenizer = src / "fake.model"
        tokenizer.write_bytes(b"not a model")
    out = tmp_path / "out"
    rc = build("--input", inp, "--output", out, "--tokenizer", tokenizer, "--workers", 0, *extra)
    msg = _err(capsys)
    assert rc == 2 and msg.startswith("error: ") and expect in msg, msg
    assert not (out / "manifest.json").exists()


def test_output_protection(tmp_path, tok, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:40])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert build("--input", src, "--output", out, "--tokenizer", tok, "--workers", 0) == 2
    assert "not empty" in _err(capsys)
    assert build("--input", src, "--output", out, "--tokenizer", tok, "--workers", 0, "--overwrite") == 2
    assert "refusing" in _err(capsys) and (out / "precious.txt").exists()
    out2 = tmp_path / "out2"
    assert build("--input", src, "--output", out2, "--tokenizer", tok, "--workers", 0) == 0
    assert build("--input", src, "--output", out2, "--tokenizer", tok, "--workers", 0, "--overwrite") == 0
    assert TokenShards(out2).n_tokens > 0


def test_token_dtype_is_checked_never_wrapped(tmp_path, tok):
    """uint16 while every id fits, else uint32; every unit checks its ids against the dtype."""
    from data_prep.build import token_dtype
    from data_prep.encode import process_unit
    from data_prep.sources import Unit

    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:5])
    unit = Unit("000-0000000", [("jsonl", str(src))])
    cfg = {"eod_id": 2, "dtype": "uint32", "val_fraction": 0.0, "max_doc_bytes": 1 << 20}
    res = process_unit(unit, tok.read_bytes(), cfg)
    assert res["train_tokens"].dtype == np.uint32 and res["train_tokens"].max() >= 256
    with pytest.raises(ValueError, match="does not fit uint8"):  # ids of a 400-piece vocabulary
        process_unit(unit, tok.read_bytes(), dict(cfg, dtype="uint8"))
