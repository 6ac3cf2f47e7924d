"""Weights format and checkpoint resolution (single process, no process group needed)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tokenformer_dist.checkpoint.engine import iter_full_weights, read_config, resolve_checkpoint
from tokenformer_dist.checkpoint.weights import write_sharded_weights
from tokenformer_dist.config import load_config
from tokenformer_dist.distributed.sharding import is_tp_sharded


def test_tp_sharded_rule():
    assert is_tp_sharded("embedding.weight")
    assert is_tp_sharded("blocks.3.attn.query.key_tokens") and is_tp_sharded("blocks.0.ffn.value_tokens")
    assert not is_tp_sharded("blocks.0.ffn.tau") and not is_tp_sharded("final_norm.weight")


def test_write_shards_and_read_back_full(tmp_path):
    cfg = load_config(None, ["model.vocab_size=16", "model.d_model=8", "model.n_heads=1"], tp=2)
    g = torch.Generator().manual_seed(0)
    full = {"embedding.weight": torch.randn(16, 8, generator=g), "blocks.0.ffn.key_tokens": torch.randn(6, 8),
            "blocks.0.ffn.tau": torch.tensor(2.5), "final_norm.bias": torch.randn(8)}
    out = write_sharded_weights(tmp_path / "w", cfg, iter(full.items()), tp=2, manifest_extra={"note": "x"})
    assert json.loads((out / "manifest.json").read_text()) == {"format": "tokenformer-dist-weights", "tp": 2,
                                                               "note": "x"}
    r1 = load_file(str(out / "model_tp01.safetensors"))
    key = "blocks.0.ffn.key_tokens"
    torch.testing.assert_close(r1[key], full[key][3:], rtol=0, atol=0)
    torch.testing.assert_close(r1["final_norm.bias"], full["final_norm.bias"], rtol=0, atol=0)
    back = dict(iter_full_weights(out))
    assert sorted(back) == sorted(full)
    for k, v in full.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    assert resolve_checkpoint(out) == out and read_config(out).model.vocab_size == 16
    with pytest.raises(ValueError, match="already exists"):
        write_sharded_weights(out, cfg, iter(full.items()), tp=2)
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temp dirs left behind


def test_resolve_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nothing")):
        resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "run")


def test_load_weights_resharded_reads_any_tp_on_one_device(tmp_path):
    """A TP-4 weights dir loaded into a one-device model through the one reader: every tensor exactly (tau
    included); a model of another shape, or a truncated rank file, is a one-line error naming the file."""
    from tokenformer_dist.checkpoint.engine import load_weights_resharded
    from tokenformer_dist.model.tokenformer import TokenFormer

    small = ["model.vocab_size=64", "model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.seq_len=16",
             "model.qkv_tokens=8", "model.proj_tokens=8", "model.ffn_tokens=16"]
    cfg = load_config(None, small, tp=4)
    source = TokenFormer(cfg.model, seed=3)
    with torch.no_grad():
        source.blocks[1].ffn.tau.fill_(7.0)  # as after a lossless expansion: not the config's default
    out = write_sharded_weights(tmp_path / "w", cfg, source.state_dict().items(), tp=4)
    model = TokenFormer(cfg.model, init_weights=False)
    load_weights_resharded(model, out)
    got = model.state_dict()
    for name, want in source.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)
    other = TokenFormer(load_config(None, [*small, "model.ffn_tokens=32"]).model, init_weights=False)
    with pytest.raises(ValueError, match="ffn.key_tokens has shape"):
        load_weights_resharded(other, out)
    shard = out / "model_tp03.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match="model_tp03.safetensors: truncated"):
        load_weights_resharded(model, out)
