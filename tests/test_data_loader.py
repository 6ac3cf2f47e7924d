"""tokenformer_dist.data: windows, the global order independent of the data-parallel size, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards as shards_mod
from data_prep.build import main
from tests.data_fixtures import make_docs, write_jsonl
from tokenformer_dist.data import DatasetError, Permutation, TokenShards, WindowLoader

SEQ = 16


def _build(tmp: Path) -> Path:
    src = write_jsonl(tmp / "docs.jsonl", make_docs(200, seed=3))
    out = tmp / "ds"
    args = ["--input", str(src), "--output", str(out), "--vocab-size", "400", "--workers", "0"]
    assert main(args + ["--val-fraction", "0.2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    """A dataset whose token arrays have many small chunk files (windows cross chunk boundaries)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(shards_mod, "CHUNK_TOKENS", 1000)
    try:
        return _build(tmp_path_factory.mktemp("ds"))
    finally:
        mp.undo()


def test_token_shards_view(ds):
    import zarr

    s = TokenShards(ds, "train")
    man = json.loads((ds / "manifest.json").read_text())
    assert s.vocab_size == 400 and s.eod_id == man["eod_id"] and s.dtype == np.uint16
    assert s.n_tokens == man["splits"]["train"]["tokens"] and s.chunk == 1000 and s.n_tokens > 5 * 1000
    ref = zarr.open_array(str(ds / "train" / "tokens"), mode="r")[:]
    assert np.array_equal(s.tokens(0, s.n_tokens), ref)
    assert s.n_windows(SEQ) == (s.n_tokens - 1) // SEQ
    for i in [0, 1, 62, 63, 124, s.n_windows(SEQ) - 1]:  # 1000 = 62*16 + 8: window 62 spans two chunks
        w = s.window(i, SEQ)
        assert w.shape == (SEQ + 1,) and np.array_equal(w, ref[i * SEQ : i * SEQ + SEQ + 1])
    with pytest.raises(IndexError):
        s.window(s.n_windows(SEQ), SEQ)
    v = TokenShards(ds, "val")
    assert v.n_tokens == man["splits"]["val"]["tokens"] > 0
    offs = s.doc_offsets()
    assert offs[-1] == s.n_tokens and (ref[offs[1:] - 1] == s.eod_id).all()


def test_missing_or_unfinished_datasets(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        TokenShards(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no manifest.json"):
        TokenShards(tmp_path)
    (tmp_path / ".build").mkdir()
    with pytest.raises(DatasetError, match="--resume"):
        TokenShards(tmp_path)


def test_missing_split_and_damaged_chunk(ds, tmp_path):
    import shutil

    with pytest.raises(DatasetError, match="no split 'test'"):
        TokenShards(ds, "test")
    d = tmp_path / "copy"
    shutil.copytree(ds, d)
    (d / "train" / "tokens" / "c" / "2").write_bytes(b"\x00" * 10)
    with pytest.raises(DatasetError, match="wrong size"):
        TokenShards(d)


def test_permutation_is_a_bijection_fixed_by_seed_and_epoch():
    for n in (1, 2, 3, 7, 100, 1023, 1024, 1025, 50_000):
        p = Permutation(n, seed=5, epoch=0)(np.arange(n))
        assert np.array_equal(np.sort(p), np.arange(n))
        assert np.array_equal(p, Permutation(n, seed=5, epoch=0)(np.arange(n)))
    a, b, c = (Permutation(5000, s, e)(np.arange(5000)) for s, e in [(1, 0), (1, 1), (2, 0)])
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def _global_rounds(ds, mbs, dp, n_rounds, seed=7, split="train", state=None):
    """Per round: the concatenation of every rank's micro-batch (the global batch)."""
    loaders = [WindowLoader(ds, split, SEQ, mbs, r, dp, seed=seed) for r in range(dp)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    iters = [iter(ld) for ld in loaders]
    rounds = [torch.cat([next(it) for it in iters]) for _ in range(n_rounds)]
    return rounds, loaders


def test_global_order_is_independent_of_dp_size(ds):
    n_rounds = 8
    ref, _ = _global_rounds(ds, 8, 1, n_rounds)
    for mbs, dp in [(4, 2), (2, 4), (1, 8)]:
        got, loaders = _global_rounds(ds, mbs, dp, n_rounds)
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b)
        assert loaders[0].state_dict()["position"] == n_rounds * 8
    b = ref[0]
    assert b.dtype == torch.int64 and b.shape == (8, SEQ + 1)
    s = TokenShards(ds)
    # every sample is a window of the token array
    assert any(np.array_equal(b[0].numpy(), s.window(i, SEQ)) for i in range(s.n_windows(SEQ)))


def test_resume_at_another_dp_size_continues_the_same_order(ds):
    full, _ = _global_rounds(ds, 4, 2, 10)
    _, loaders = _global_rounds(ds, 4, 2, 4)
    state = json.loads(json.dumps(loaders[1].state_dict()))  # JSON-serialisable
    assert state["position"] == 4 * 8 and state["seed"] == 7 and state["epoch"] == 0
    rest, _ = _global_rounds(ds, 2, 4, 6, seed=999, state=state)  # the seed comes from the state
    for a, b in zip(full[4:], rest, strict=True):
        assert torch.equal(a, b)
    # a different global batch also resumes at the same global position
    rest1, _ = _global_rounds(ds, 16, 1, 3, state=state)
    flat = torch.cat(full[4:])
    assert torch.equal(torch.cat(rest1), flat[: 3 * 16])


def test_epochs_roll_over_with_a_new_permutation(ds):
    ld = WindowLoader(ds, "train", SEQ * 4, 1, 0, 1, seed=1)
    n = ld.n_windows // ld.global_batch
    assert n == ld.shards.n_windows(SEQ * 4)
    it = iter(ld)
    e0 = torch.cat([next(it) for _ in range(n)])
    assert ld.state_dict()["epoch"] == 0
    e1 = torch.cat([next(it) for _ in range(n)])
    assert ld.state_dict()["epoch"] == 1
    rows0 = sorted(tuple(r.tolist()) for r in e0)
    assert rows0 == sorted(tuple(r.tolist()) for r in e1) and not torch.equal(e0, e1)
    assert len(set(rows0)) == n  # every window exactly once per epoch
    ld8 = WindowLoader(ds, "train", SEQ * 4, 4, 1, 2, seed=1)
    n8 = ld8.n_windows // ld8.global_batch
    assert n8 * 8 <= n < (n8 + 1) * 8  # the tail (< one round) is dropped
    it8 = iter(ld8)
    for _ in range(n8 + 1):
        next(it8)
    assert ld8.state_dict()["epoch"] == 1 and ld8.state_dict()["position"] == 8


def test_unshuffled_iteration_walks_windows_in_order(ds):
    dp, mbs = 2, 3
    ld = WindowLoader(ds, "val", SEQ, mbs, 1, dp, seed=0, shuffle=False)
    s = ld.shards
    b = next(iter(ld))
    assert np.array_equal(b.numpy(), np.stack([s.window(i, SEQ) for i in range(mbs, 2 * mbs)]))


def test_prefetcher_hands_out_the_same_batches_and_exact_state(ds):
    """Read-ahead on a thread must not move the checkpointed position past what was consumed."""
    from tokenformer_dist.data import Prefetcher

    plain = WindowLoader(ds, "train", SEQ, 2, 1, 2, seed=5)
    it = iter(plain)
    want = [next(it) for _ in range(12)]
    ld = WindowLoader(ds, "train", SEQ, 2, 1, 2, seed=5)
    pf = Prefetcher(ld, torch.device("cpu"), depth=4)
    got = [next(pf) for _ in range(5)]
    time.sleep(0.2)  # let the thread run ahead
    state = pf.state_dict()
    pf.close()
    assert state["position"] == 5 * 4 and ld.state_dict()["position"] > state["position"]
    resumed = WindowLoader(ds, "train", SEQ, 2, 1, 2, seed=0)
    resumed.load_state_dict(state)
    pf2 = Prefetcher(resumed, torch.device("cpu"), depth=2)
    got += [next(pf2) for _ in range(7)]
    pf2.close()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_loader_errors(ds):
    with pytest.raises(ValueError, match="dp_rank"):
        WindowLoader(ds, "train", SEQ, 2, 2, 2, seed=0)
    with pytest.raises(DatasetError, match="fewer than one round"):
        WindowLoader(ds, "val", 4096, 64, 0, 8, seed=0)
    ld = WindowLoader(ds, "train", SEQ, 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        ld.load_state_dict(dict(ld.state_dict(), seq_len=32))
