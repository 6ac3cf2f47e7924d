#!/usr/bin/env python
"""Build sentencepiece-tokenized zarr shards from OpenWebText (or any text corpus) with Ray.

    python data_prep/build.py                        # sample dataset from installed packages -> data/sample
    python data_prep/build.py --input openwebtext.tar.xz --output data/owt
    python data_prep/build.py --input corpus/ --output data/c --tokenizer tok.model --ray-address auto

See docs/data.md for the format, determinism, resume and the loader.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_prep import shards as shards_mod
from data_prep import sources, tokenizer
from data_prep.runners import MB, LocalRunner, RayRunner, log, make_runner
from data_prep.sources import DataError
from tokenformer_dist.atomic import atomic_write_bytes
from tokenformer_dist.cli import ArgumentParser
from tokenformer_dist.data import FORMAT

FORMAT_VERSION = 1
DEFAULT_VOCAB = 50304
SAMPLE_VOCAB = 8192
DEFAULT_VAL_FRACTION = 0.0005
SAMPLE_VAL_FRACTION = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python data_prep/build.py",
        description="Tokenize a text corpus into zarr shards for tokenformer-dist (Ray, sentencepiece).",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        type=Path,
        default=None,
        metavar="PATH",
        help="openwebtext.tar.xz, a directory of urlsf_subset*.xz or subsets/*.tar, JSONL(.gz/.zst), "
        "parquet, or a directory of .txt (repeatable). Without it: a sample dataset.",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output directory (default data/sample without --input, else data/shards)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"train a tokenizer of this size (default {DEFAULT_VOCAB}; sample {SAMPLE_VOCAB})",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="reuse this sentencepiece .model (with --vocab-size: checked to match)",
    )
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"fraction of documents in val, by a stable hash (default {DEFAULT_VAL_FRACTION}; "
        f"sample {SAMPLE_VAL_FRACTION})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="concurrent Ray tasks (default: all CPUs of the machine / cluster); 0 = no Ray",
    )
    p.add_argument("--ray-address", default=None, help="address of an existing Ray cluster (e.g. auto)")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true", help="finish an interrupted build in --output")
    r.add_argument("--overwrite", action="store_true", help="delete an existing dataset in --output first")
    p.add_argument(
        "--block-mb",
        type=float,
        default=None,
        help="text per task (default: input size / 256, between 1 and 16 MB)",
    )
    p.add_argument(
        "--max-doc-mb",
        type=float,
        default=16.0,
        help="documents larger than this are skipped and counted (default 16)",
    )
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=64.0,
        help="text used to train the tokenizer (default 64)",
    )
    p.add_argument("--sample-mb", type=float, default=5.0, help="size of the sample corpus (no --input)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.workers is not None and a.workers < 0:
        p.error("--workers must be >= 0")
    if a.vocab_size is not None and a.vocab_size < 300:
        p.error("--vocab-size must be at least 300 (byte fallback needs 256 byte pieces)")
    if a.val_fraction is not None and not 0.0 <= a.val_fraction < 1.0:
        p.error("--val-fraction must be in [0, 1)")
    return a


# --------------------------------------------------------------------------------------------- #


def _file_list(inputs: list[Path]) -> tuple[list[list[tuple[Path, str]]], Counter]:
    stats: Counter = Counter()
    return [sources.list_input_files(i, stats) for i in inputs], stats


def _fingerprint(files: list[list[tuple[Path, str]]], det_args: dict) -> str:
    h = hashlib.sha256(json.dumps(det_args, sort_keys=True).encode())
    for group in files:
        for path, fmt in group:
            st = path.stat()
            h.update(f"{path}\0{fmt}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _looks_like_ours(out: Path) -> bool:
    return (out / "manifest.json").exists() or shards_mod.build_dir(out).exists() or not any(out.iterdir())


def prepare_output(out: Path, args, fingerprint: str) -> bool:
    """Check/clear the output directory. Returns True if a complete identical dataset is already there."""
    state = shards_mod.build_dir(out) / "state.json"  # the interrupted build's fingerprint
    if out.exists() and not out.is_dir():
        raise DataError(f"--output is not a directory: {out}")
    if out.exists() and any(out.iterdir()):
        if args.overwrite:
            if not _looks_like_ours(out):
                raise DataError(f"refusing to --overwrite {out}: it is not a dataset built by this tool")
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif args.resume:
            man = out / "manifest.json"
            if man.exists():
                old = json.loads(man.read_text()).get("run", {}).get("fingerprint")
                if old != fingerprint:
                    raise DataError(
                        f"{out} holds a dataset built from other inputs or arguments; "
                        "use --overwrite to rebuild it"
                    )
                shutil.rmtree(shards_mod.build_dir(out), ignore_errors=True)
                return True
            if state.exists():
                old = json.loads(state.read_text()).get("fingerprint")
                if old != fingerprint:
                    raise DataError(
                        f"the interrupted build in {out} used other inputs or arguments; "
                        "use --overwrite to start again"
                    )
            elif not _looks_like_ours(out):
                raise DataError(f"cannot --resume in {out}: it is not a dataset built by this tool")
        else:
            raise DataError(
                f"output directory {out} is not empty: pass --resume to finish an interrupted "
                "build or --overwrite to replace it"
            )
    parts = shards_mod.parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp"):
        stale.unlink()
    atomic_write_bytes(state, json.dumps({"fingerprint": fingerprint}).encode())
    return False


# --------------------------------------------------------------------------------------------- #


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (ids < vocab_size <= 65536), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _crash_hook(stage: str) -> None:
    if os.environ.get("TFD_BUILD_CRASH_AT") == stage:  # test hook: simulate a kill at this stage
        os._exit(137)


# --------------------------------------------------------------------------------------------- #


@dataclass
class BuildState:
    """What one build knows, step by step: inputs and output, then the tokenizer, then the tokenized units."""

    args: argparse.Namespace
    out: Path
    inputs: list[Path]
    sample: bool
    t0: float
    files: list[list[tuple[Path, str]]] = field(default_factory=list)
    det_args: dict = field(default_factory=dict)
    fingerprint: str = ""
    # the tokenizer
    vocab: int = 0
    eod: int = 0
    dtype: str = ""
    tok_info: dict = field(default_factory=dict)
    # the tokenize step
    keys: list[str] = field(default_factory=list)  # every unit, in output order
    resumed: int = 0  # units already done by an interrupted build
    totals: Counter = field(default_factory=Counter)
    plan_stats: Counter = field(default_factory=Counter)
    workers: int = 0  # 0 = in-process; else the runner's concurrent tasks
    t_tokenize: float = 0.0
    task_cpu_seconds: float = 0.0

    @property
    def build_dir(self) -> Path:
        return shards_mod.build_dir(self.out)

    @property
    def parts_dir(self) -> Path:
        return shards_mod.parts_dir(self.out)


def _resolve_inputs(args: argparse.Namespace, t0: float) -> BuildState | None:
    """The inputs and output directory (writing the sample corpus when no --input); None: nothing to do."""
    sample = args.input is None
    if sample:
        from data_prep.sample import write_sample_text

        out = args.output or Path("data/sample")
        man = out / "manifest.json"
        if not (args.resume or args.overwrite) and man.exists() and json.loads(man.read_text()).get("sample"):
            log(f"the sample dataset {out} already exists (pass --overwrite to rebuild it)")
            return None
        text_dir = out.parent / (out.name + "-text")
        path, n_docs, n_bytes = write_sample_text(text_dir, int(args.sample_mb * MB))
        if n_bytes == 0:
            raise DataError("no text found in the installed Python packages for a sample dataset")
        log(
            f"no --input given: building a SAMPLE dataset from {n_docs} docstring/documentation texts of the "
            f"installed Python packages ({n_bytes / MB:.1f} MB, written to {path})."
        )
        inputs = [path]
        if args.vocab_size is None and args.tokenizer is None:
            args.vocab_size = SAMPLE_VOCAB
        if args.val_fraction is None:
            args.val_fraction = SAMPLE_VAL_FRACTION
    else:
        out = args.output or Path("data/shards")
        inputs = list(args.input)
    if args.tokenizer is None and args.vocab_size is None:
        args.vocab_size = DEFAULT_VOCAB
    if args.val_fraction is None:
        args.val_fraction = DEFAULT_VAL_FRACTION
    inputs = [Path(os.path.abspath(i)) for i in inputs]
    out = Path(os.path.abspath(out))
    for i in inputs:
        if out == i or out in i.parents:
            raise DataError(f"--output {out} must not contain the input {i}")
        if i.is_dir() and i in out.parents:
            raise DataError(f"--output {out} must not be inside the input directory {i}")
    return BuildState(args=args, out=out, inputs=inputs, sample=sample, t0=t0)


def _tokenizer(st: BuildState, tok_given, block_bytes: int, max_doc_bytes: int, est_text: int) -> bytes:
    """Reuse the given tokenizer, the one an interrupted build trained, or train one; returns the model."""
    args, build = st.args, st.build_dir
    tok_path = st.out / "tokenizer.model"
    tok_info_path = build / "tokenizer.json"
    if tok_given is not None:
        model_bytes, vocab, eod = tok_given
        if not tok_path.exists() or tok_path.read_bytes() != model_bytes:
            atomic_write_bytes(tok_path, model_bytes)
        tok_info = {"trained": False, "source": str(Path(os.path.abspath(args.tokenizer)))}
    elif tok_path.exists() and tok_info_path.exists():  # resumed: trained before the kill
        model_bytes, vocab, eod = tokenizer.load(tok_path, args.vocab_size)
        tok_info = json.loads(tok_info_path.read_text())
        log(f"resume: reusing the trained tokenizer {tok_path}")
    else:
        tb = time.time()
        units = (
            u
            for i, inp in enumerate(st.inputs)
            for u in sources.plan_input(i, inp, block_bytes, max_doc_bytes, Counter())
        )
        sample_path = build / "tokenizer_sample.txt"
        sample_budget = int(args.tokenizer_sample_mb * MB)
        info = tokenizer.collect_sample(
            units, sample_budget, max(1, est_text // block_bytes), max_doc_bytes, sample_path
        )
        if info["sentences"] == 0:
            raise DataError("no documents found in the inputs (nothing to train a tokenizer on)")
        log(
            f"training a {args.model_type} tokenizer, vocab {args.vocab_size}, "
            f"on {info['sentences']} sentences ({info['bytes'] / MB:.1f} MB)..."
        )
        tokenizer.train(sample_path, build / "tokenizer.model.new", args.vocab_size, args.model_type)
        sample_path.unlink()
        tok_info = {"trained": True, "model_type": args.model_type, "sample": info}
        atomic_write_bytes(tok_info_path, json.dumps(tok_info, sort_keys=True).encode())
        os.replace(build / "tokenizer.model.new", tok_path)
        model_bytes, vocab, eod = tokenizer.load(tok_path, args.vocab_size)
        log(f"tokenizer trained in {time.time() - tb:.1f} s")
    tok_info["sha256"] = hashlib.sha256(model_bytes).hexdigest()
    st.vocab, st.eod, st.dtype, st.tok_info = vocab, eod, token_dtype(vocab), tok_info
    return model_bytes


def _tokenize(st: BuildState, runner: LocalRunner | RayRunner, model_bytes: bytes, block_bytes: int,
              max_doc_bytes: int, total_bytes: int) -> None:
    """One task per unit (units already done by an interrupted build are counted, not redone)."""
    from tqdm import tqdm

    cfg = {"eod_id": st.eod, "dtype": st.dtype, "val_fraction": st.args.val_fraction,
           "max_doc_bytes": max_doc_bytes}
    t_start = time.time()
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="tokenizing",
        disable=st.args.no_progress,
        mininterval=1.0,
        smoothing=0.05,
        file=sys.stderr,
    )
    model_ref = runner.put(model_bytes)
    inflight: dict = {}
    max_inflight = 2 * runner.workers

    def account(unit: sources.Unit, stats: dict) -> None:
        st.totals.update(stats)
        bar.update(unit.nbytes)
        bar.set_postfix_str(
            f"docs={st.totals['documents']:,} tokens={st.totals['train_tokens'] + st.totals['val_tokens']:,}",
            refresh=False,
        )

    def finish(ref) -> None:
        unit = inflight.pop(ref)
        res = runner.get(ref)
        shards_mod.write_part(st.parts_dir, unit.key, res)
        st.task_cpu_seconds += res.get("cpu_seconds", 0.0)
        account(unit, res["stats"])

    for i, inp in enumerate(st.inputs):
        for unit in sources.plan_input(i, inp, block_bytes, max_doc_bytes, st.plan_stats):
            st.keys.append(unit.key)
            if shards_mod.part_path(st.parts_dir, unit.key).exists():
                account(unit, shards_mod.read_part_stats(st.parts_dir, unit.key))
                st.resumed += 1
                continue
            while len(inflight) >= max_inflight:
                finish(runner.wait_one(inflight))
            inflight[runner.submit(unit, model_ref, cfg)] = unit
    while inflight:
        finish(runner.wait_one(inflight))
    bar.close()
    st.t_tokenize = time.time() - t_start
    st.workers = 0 if st.args.workers == 0 else runner.workers


def run(args: argparse.Namespace) -> int:
    st = _resolve_inputs(args, time.time())
    if st is None:
        return 0
    st.files, _ = _file_list(st.inputs)
    total_bytes = sum(p.stat().st_size for g in st.files for p, _ in g)
    est_text = sum(sources._est(fmt, p.stat().st_size) for g in st.files for p, fmt in g)
    if args.block_mb is not None:
        block_bytes = max(4096, int(args.block_mb * MB))
    else:
        block_bytes = int(min(16 * MB, max(1 * MB, est_text // 256)))
    max_doc_bytes = int(args.max_doc_mb * MB)

    tok_given = None
    if args.tokenizer is not None:
        tok_given = tokenizer.load(args.tokenizer, args.vocab_size)
    st.det_args = {
        "vocab_size": args.vocab_size if tok_given is None else tok_given[1],
        "tokenizer": None if tok_given is None else hashlib.sha256(tok_given[0]).hexdigest(),
        "model_type": args.model_type if tok_given is None else None,
        "val_fraction": args.val_fraction,
        "block_bytes": block_bytes,
        "max_doc_bytes": max_doc_bytes,
        "tokenizer_sample_bytes": int(args.tokenizer_sample_mb * MB) if tok_given is None else None,
        "tokenizer_train_threads": tokenizer.TRAIN_THREADS if tok_given is None else None,
    }
    st.fingerprint = _fingerprint(st.files, st.det_args)
    if prepare_output(st.out, args, st.fingerprint):
        log(f"{st.out} is already complete (nothing to do)")
        return 0

    model_bytes = _tokenizer(st, tok_given, block_bytes, max_doc_bytes, est_text)
    _crash_hook("after-tokenizer")

    runner = make_runner(args.workers, args.ray_address, st.out, block_bytes, st.inputs)
    try:
        _tokenize(st, runner, model_bytes, block_bytes, max_doc_bytes, total_bytes)
    except BaseException:
        runner.close()
        raise
    # Ray's shutdown (~1.5 s) overlaps the assembly below.
    closer = threading.Thread(target=runner.close, daemon=True)
    closer.start()
    try:
        return _assemble(st, closer)
    finally:
        closer.join()


def _assemble(st: BuildState, closer: threading.Thread) -> int:
    """Assemble the splits from the parts, write the manifest, clean up."""
    args, out, build, parts_dir, totals = st.args, st.out, st.build_dir, st.parts_dir, st.totals
    vocab, eod, dtype = st.vocab, st.eod, st.dtype
    if st.resumed:
        log(f"resume: {st.resumed} of {len(st.keys)} units were already done and were not redone")
    totals.update(st.plan_stats)  # skips counted while planning (symlinks, tar members, ...)
    if totals["documents"] == 0:
        raise DataError("no documents found in the inputs (all empty or skipped)")
    _crash_hook("after-parts")

    # ---- assemble zarr arrays, then the manifest ---------------------------------------------
    splits = {}
    for split in shards_mod.SPLITS:
        splits[split] = shards_mod.assemble_split(parts_dir, st.keys, split, out / split, build, dtype)
        _crash_hook(f"after-{split}")
    import zarr

    if not (out / "zarr.json").exists():
        zarr.create_group(
            store=str(out),
            zarr_format=3,
            overwrite=False,
            attributes={"format": FORMAT, "vocab_size": vocab, "eod_id": eod, "dtype": dtype},
        )
    counts = {k: int(v) for k, v in sorted(totals.items()) if not k.startswith(("train_", "val_"))}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab,
        "eod_id": eod,
        "dtype": dtype,
        "tokenizer": {"file": "tokenizer.model", **st.tok_info},
        "splits": {
            s: {
                "documents": splits[s]["documents"],
                "tokens": splits[s]["tokens"],
                "tokens_array": f"{s}/tokens",
                "doc_offsets_array": f"{s}/doc_offsets",
                "chunk_tokens": splits[s]["chunk_tokens"],
            }
            for s in shards_mod.SPLITS
        },
        "counts": counts,
        "inputs": [
            {
                "path": str(inp),
                "files": len(g),
                "bytes": sum(p.stat().st_size for p, _ in g),
                "formats": sorted({f for _, f in g}),
            }
            for inp, g in zip(st.inputs, st.files, strict=True)
        ],
        "sample": st.sample,
        "arguments": st.det_args,
        "units": len(st.keys),
        "run": {  # the only part that may differ between two builds of the same data
            "workers": st.workers,
            "ray_address": args.ray_address,
            "seconds": round(time.time() - st.t0, 3),
            "fingerprint": st.fingerprint,
            "tokenize_seconds": round(st.t_tokenize, 3),
            "task_cpu_seconds": round(st.task_cpu_seconds, 3),
        },
    }
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    closer.join()
    shutil.rmtree(build, ignore_errors=True)

    ntok = splits["train"]["tokens"] + splits["val"]["tokens"]
    log(
        f"built {out}: train {splits['train']['documents']:,} docs / {splits['train']['tokens']:,} tokens, "
        f"val {splits['val']['documents']:,} docs / {splits['val']['tokens']:,} tokens; "
        f"vocab {vocab} ({dtype}), eod id {eod}; {time.time() - st.t0:.1f} s "
        f"({ntok / max(st.t_tokenize, 1e-9) / 1e6:.2f} M tokens/s tokenizing)"
    )
    dropped = {k: v for k, v in counts.items() if k.startswith(("dropped", "skipped", "invalid")) and v}
    if dropped:
        log("skipped/counted: " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    if st.sample:
        log(
            f"this is a small sample (vocab {vocab}). For OpenWebText run:\n"
            "  python data_prep/build.py --input /path/to/openwebtext.tar.xz --output data/owt"
        )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("interrupted: rerun with --resume to finish")
        return 130


if __name__ == "__main__":
    # `python data_prep/build.py` runs this file as __main__: the code above came from the installed
    # data_prep package (see pyproject.toml), so this is the same build as `python -m data_prep.build`.
    sys.exit(main())
