"""Training data: a memory-mapped view of the zarr token shards built by data_prep/build.py, and the
data-parallel window loader.

The token arrays are zarr v3 arrays with no compression, so their chunk files (`<split>/tokens/c/<i>`)
are raw little-endian bytes; they are memory-mapped here (zarr itself would decode a whole chunk per
slice). Windows are `seq_len + 1` tokens starting at multiples of `seq_len`.

Global order: for each epoch, a pseudo-random permutation of the window indices fixed by (seed, epoch)
(a keyed Feistel network with cycle walking: O(1) memory, identical on every machine and numpy
version). Training consumes the order in rounds of `micro_batch_size * dp_size` consecutive samples;
rank r takes the slice [r * micro_batch_size, (r + 1) * micro_batch_size) of each round. The position
in the global order is what the checkpoint keeps, so a resume at another data-parallel size carries on
with the same sequence. A round that would run past the end of the epoch is not started: the epoch's
remaining (fewer than one round of) windows are skipped and the next epoch begins.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

FORMAT = "tokenformer-dist/zarr-token-shards"
_M64 = (1 << 64) - 1


class DatasetError(ValueError):
    """The directory is not a (complete) dataset built by data_prep/build.py."""


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{what}: {path} not found") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{what}: cannot read {path}: {e}") from None


class TokenShards:
    """Read-only view of one split (`train` or `val`) of a built dataset."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise DatasetError(
                f"dataset directory {self.data_dir} does not exist (build it with python data_prep/build.py)"
            )
        man_path = self.data_dir / "manifest.json"
        if not man_path.exists():
            # the build writes manifest.json last: a non-empty directory without it may be an interrupted build
            hint = " (an unfinished build? rerun it with --resume)" if any(self.data_dir.iterdir()) else ""
            raise DatasetError(f"{self.data_dir} is not a tokenformer-dist dataset: no manifest.json{hint}")
        man = _read_json(man_path, "dataset manifest")
        if man.get("format") != FORMAT:
            raise DatasetError(f"{man_path} is not a {FORMAT} manifest")
        if split not in man.get("splits", {}):
            raise DatasetError(
                f"{self.data_dir} has no split {split!r} (has {sorted(man.get('splits', {}))})"
            )
        self.manifest = man
        self.split = split
        self.vocab_size: int = int(man["vocab_size"])
        self.eod_id: int = int(man["eod_id"])
        self.dtype: np.dtype = np.dtype(man["dtype"])
        arr_dir = self.data_dir / man["splits"][split]["tokens_array"]
        meta = _read_json(arr_dir / "zarr.json", "token array metadata")
        codecs = meta.get("codecs", [])
        if (
            meta.get("zarr_format") != 3
            or len(codecs) != 1
            or codecs[0].get("name") != "bytes"
            or codecs[0].get("configuration", {}).get("endian", "little") != "little"
        ):
            raise DatasetError(f"{arr_dir} is not an uncompressed little-endian zarr v3 array")
        if np.dtype(meta["data_type"]) != self.dtype:
            raise DatasetError(
                f"{arr_dir}: dtype {meta['data_type']} disagrees with the manifest ({self.dtype})"
            )
        self.n_tokens: int = int(meta["shape"][0])
        if self.n_tokens != int(man["splits"][split]["tokens"]):
            raise DatasetError(
                f"{arr_dir}: {self.n_tokens} tokens, the manifest says {man['splits'][split]['tokens']}"
            )
        self.chunk: int = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self._dir = arr_dir / "c"
        n_chunks = -(-self.n_tokens // self.chunk) if self.n_tokens else 0
        self._maps: list = [None] * n_chunks
        for i in range(n_chunks):
            p = self._dir / str(i)
            if not p.exists() or p.stat().st_size != self.chunk * self.dtype.itemsize:
                raise DatasetError(f"{p} is missing or has the wrong size (a damaged dataset)")
        dt = self.dtype.newbyteorder("<")
        self._dt = dt
        if n_chunks == 1:  # the common case of small data: one mapping, no chunk arithmetic
            self._single = self._map(0)
        else:
            self._single = None

    def _map(self, c: int) -> np.ndarray:
        m = self._maps[c]
        if m is None:
            m = self._maps[c] = np.memmap(self._dir / str(c), dtype=self._dt, mode="r")
        return m

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """A copy of tokens[start:stop] (may span chunk files)."""
        if start < 0 or stop > self.n_tokens or start > stop:
            raise IndexError(f"tokens[{start}:{stop}] out of range 0..{self.n_tokens}")
        if self._single is not None:
            return np.array(self._single[start:stop])
        c, off = divmod(start, self.chunk)
        if off + (stop - start) <= self.chunk:
            return np.array(self._map(c)[off : off + stop - start])
        out = np.empty(stop - start, self._dt)
        pos = 0
        while start < stop:
            c, off = divmod(start, self.chunk)
            n = min(self.chunk - off, stop - start)
            out[pos : pos + n] = self._map(c)[off : off + n]
            pos += n
            start += n
        return out

    def window(self, i: int, seq_len: int) -> np.ndarray:
        """tokens[i*seq_len : i*seq_len + seq_len + 1]"""
        s = i * seq_len
        if self._single is not None and 0 <= i and s + seq_len < self.n_tokens:
            return np.array(self._single[s : s + seq_len + 1])
        if i < 0 or i >= self.n_windows(seq_len):
            raise IndexError(f"window {i} out of range (n_windows={self.n_windows(seq_len)})")
        return self.tokens(s, s + seq_len + 1)

    def n_windows(self, seq_len: int) -> int:
        return max(0, (self.n_tokens - 1) // seq_len)

    def doc_offsets(self) -> np.ndarray:
        """Start of every document in the token array, then n_tokens (int64, len = documents + 1)."""
        d = self.data_dir / self.manifest["splits"][self.split]["doc_offsets_array"]
        meta = _read_json(d / "zarr.json", "doc offsets metadata")
        n, ch = int(meta["shape"][0]), int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        parts = [np.fromfile(d / "c" / str(i), dtype="<i8") for i in range(-(-n // ch))]
        return np.concatenate(parts)[:n] if parts else np.zeros(0, np.int64)


# --------------------------------------------------------------------------------------------- #
# A keyed pseudo-random permutation of range(n)
# --------------------------------------------------------------------------------------------- #


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix64_int(x: int) -> int:
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """Bijection of range(n) fixed by (seed, epoch): a 6-round Feistel network on the smallest even
    number of bits covering n, with cycle walking back into range."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = int(n)
        bits = max(2, (max(1, self.n - 1)).bit_length())
        bits += bits & 1
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        base = _mix64_int(_mix64_int(int(seed) & _M64) ^ ((int(epoch) * 0x9E3779B97F4A7C15) & _M64))
        self.keys = [np.uint64(_mix64_int(base + r + 1)) for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        with np.errstate(over="ignore"):
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, idx) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64)
        with np.errstate(over="ignore"):
            y = self._feistel(x)
            bad = y >= np.uint64(self.n)
            while bad.any():
                y[bad] = self._feistel(y[bad])
                bad = y >= np.uint64(self.n)
        return y.astype(np.int64)


# --------------------------------------------------------------------------------------------- #


class WindowLoader:
    """Training batches for one data-parallel rank (see the module docstring for the order)."""

    def __init__(
        self,
        data_dir,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError("seq_len and micro_batch_size must be >= 1")
        self.shards = TokenShards(data_dir, split)
        self.split, self.seq_len, self.micro_batch_size = split, int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.n_windows = self.shards.n_windows(self.seq_len)
        self.global_batch = self.micro_batch_size * self.dp_size
        if self.n_windows < self.global_batch:
            raise DatasetError(
                f"{split} split of {self.shards.data_dir} has {self.n_windows} windows of {self.seq_len + 1} "
                f"tokens, fewer than one round of micro_batch_size*dp_size = {self.global_batch}"
            )
        self.epoch = 0
        self.position = 0  # samples of the global order consumed in this epoch (all ranks together)
        self.samples_consumed = 0  # over all epochs
        self._perm_cache: tuple | None = None

    # -- order -------------------------------------------------------------------------------- #
    _BLOCK = 4096  # positions of the global order computed at a time

    def global_indices(self, epoch: int, start: int, count: int) -> np.ndarray:
        """Window indices at positions [start, start+count) of the global order of `epoch`."""
        if not self.shuffle:
            return np.arange(start, start + count, dtype=np.int64)
        if self._perm_cache is None or self._perm_cache[0] != (self.seed, epoch):
            self._perm_cache = ((self.seed, epoch), Permutation(self.n_windows, self.seed, epoch), -1, None)
        key, perm, b0, block = self._perm_cache
        if block is None or not (b0 <= start and start + count <= b0 + len(block)):
            b0 = start
            block = perm(np.arange(b0, min(self.n_windows, b0 + max(self._BLOCK, count)), dtype=np.int64))
            self._perm_cache = (key, perm, b0, block)
        return block[start - b0 : start - b0 + count]

    def _batch(self, windows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(windows), self.seq_len + 1), dtype=np.int64)
        for j, w in enumerate(windows):
            out[j] = self.shards.window(int(w), self.seq_len)
        return torch.from_numpy(out)

    def _rank_slice(self, epoch: int, round_start: int) -> np.ndarray:
        return self.global_indices(
            epoch, round_start + self.dp_rank * self.micro_batch_size, self.micro_batch_size
        )

    # -- iteration ---------------------------------------------------------------------------- #
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Endless: int64 tensors [micro_batch_size, seq_len + 1]; state_dict() counts what was yielded."""
        while True:
            if self.position + self.global_batch > self.n_windows:
                self.epoch += 1
                self.position = 0
            idx = self._rank_slice(self.epoch, self.position)
            self.position += self.global_batch
            self.samples_consumed += self.global_batch
            yield self._batch(idx)

    # -- checkpoint --------------------------------------------------------------------------- #
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "samples_consumed": self.samples_consumed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "n_tokens": self.shards.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seq_len", self.seq_len)) != self.seq_len:
            raise ValueError(
                f"loader state is for seq_len {state['seq_len']}, this loader has {self.seq_len}"
            )
        if int(state.get("n_windows", self.n_windows)) != self.n_windows:
            raise ValueError(
                f"loader state is for {state['n_windows']} windows, the dataset now has "
                f"{self.n_windows} (a different dataset?)"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.samples_consumed = int(state.get("samples_consumed", 0))
        self._perm_cache = None


class Prefetcher:
    """Reads the next `depth` batches of a WindowLoader on a background thread, pinned when the device is a
    GPU, and hands them over with a non-blocking host->device copy.

    Why: window reads (memory-mapped pages, the int64 conversion) and the copy then overlap the previous
    step instead of stalling it. The checkpoint must still record exactly what training consumed, so the
    producer snapshots the loader's state with every batch and `state_dict()` returns the snapshot of the
    last batch handed out: a resume continues with the first batch the trainer did not use, as without
    prefetch. Build it after `loader.load_state_dict`; `depth` 0 reads on the calling thread.
    """

    def __init__(self, loader: WindowLoader, device: torch.device, depth: int) -> None:
        self.loader, self.device, self.depth = loader, torch.device(device), depth
        self._state = loader.state_dict()
        self._it = iter(loader)
        self._pin = self.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
            self._thread.start()

    def _read(self) -> tuple[torch.Tensor, dict]:
        batch = next(self._it)
        return (batch.pin_memory() if self._pin else batch), self.loader.state_dict()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._read()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        item = self._queue.get() if self._thread is not None else self._read()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        """The loader state after the last batch returned by __next__ (not after what was read ahead)."""
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def check_vocab(data_vocab: int, model_vocab: int, data_dir: str | Path) -> None:
    """A dataset whose token ids reach past the model's vocabulary is refused before training: at TP 1 such
    an id asserts on the device, at TP > 1 megatron's embedding silently masks it to zero."""
    if data_vocab > model_vocab:
        raise DatasetError(f"{data_dir}: dataset vocab_size {data_vocab} (manifest.json) exceeds model.vocab_size "
                           f"{model_vocab}; set model.vocab_size >= {data_vocab} (a multiple of parallel.tp)")


def write_synthetic_dataset(out: str | Path, vocab_size: int, train_tokens: int, val_tokens: int,
                            seed: int = 0) -> Path:
    """A dataset in this module's format from a fixed random bigram chain (learnable: each token has 4
    likely successors), without a tokenizer, Ray or zarr: for GPU acceptance runs on air-gapped nodes and
    throughput benchmarks. One uncompressed chunk per split; doc_offsets mark one document per split."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab_size, size=(vocab_size, 4))
    dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
    splits = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        toks = np.empty(n, dtype=np.int64)
        toks[0] = 0
        choice = rng.integers(0, 4, size=n)
        for i in range(1, n):
            toks[i] = succ[toks[i - 1], choice[i]]
        for name, arr in (("tokens", toks.astype(dtype)), ("doc_offsets", np.array([0, n], dtype="<i8"))):
            d = out / split / name
            (d / "c").mkdir(parents=True, exist_ok=True)
            arr.tofile(d / "c" / "0")
            meta = {"shape": [len(arr)], "data_type": arr.dtype.name,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [len(arr)]}},
                    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                    "fill_value": 0, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": []}
            (d / "zarr.json").write_text(json.dumps(meta))
        splits[split] = {"documents": 1, "tokens": n, "tokens_array": f"{split}/tokens",
                         "doc_offsets_array": f"{split}/doc_offsets", "chunk_tokens": n}
    (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    manifest = {"format": FORMAT, "format_version": 1, "vocab_size": vocab_size, "eod_id": 0,
                "dtype": dtype.name, "splits": splits, "synthetic": {"seed": seed}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks the dataset complete
    return out
