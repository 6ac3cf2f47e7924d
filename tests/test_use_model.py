"""Using a trained model (issue 13): generation with a KV cache at TP 1 and 2, the Hugging Face export,
lm-evaluation-harness on it, and the import of official TokenFormer checkpoints.

Launches: one 2-process trainer run (TP 2, ZeRO 2, 60 steps of the tiny model) and one 2-process
`torchrun -m tokenformer_dist.generate`; everything else runs in this process on one device (the model is
plain torch), lm-eval included.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.ci import unavailable
from tests.dist_scripts.train_helpers import env, launch_runs, torchrun_cmd, train_argv
from tests.official_model import (
    neox_config,
    official_logits,
    random_official_state,
    write_deepspeed_layout,
    write_neox_yaml,
)
from tokenformer_dist.checkpoint.engine import iter_full_weights, read_config, resolve_checkpoint
from tokenformer_dist.checkpoint.weights import write_sharded_weights
from tokenformer_dist.inference import generate
from tokenformer_dist.model.tokenformer import TokenFormer

PROMPT = "The function returns"
NEW_TOKENS = 24
STEPS = 60

if importlib.util.find_spec("transformers") is None:  # in the [dev] extra CI installs: there it fails (tests/ci.py)
    unavailable("the [hf] extra is not installed (pip install -e '.[hf]')", allow_module_level=True)


def reshard_tp1(src, out):
    """A TP-1 copy of a checkpoint or weights dir (the expansion tool's --grow 1, without a process)."""
    write_sharded_weights(out, read_config(src), iter_full_weights(src), tp=1)
    return out


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    """trained: a trainer checkpoint written at TP 2 with ZeRO stage 2; untrained: the same config's initial
    weights as a TP-2 weights dir; *_tp1: resharded copies; gen_tp2: the generate CLI under torchrun."""
    root = tmp_path_factory.mktemp("use_model")
    launch_runs(2, [train_argv(sample_data, root / "trained", STEPS, tp=2, zero=2,
                               **{"train.log_every": 20, "train.lr": 3e-3})])
    cfg = read_config(root / "trained")
    write_sharded_weights(root / "untrained", cfg, TokenFormer(cfg.model, seed=cfg.train.seed).state_dict().items(),
                          tp=2)
    reshard_tp1(root / "trained", root / "trained_tp1")
    reshard_tp1(root / "untrained", root / "untrained_tp1")
    cmd = torchrun_cmd(2, "-m", "tokenformer_dist.generate", "--ckpt", str(root / "untrained"), "--prompt", PROMPT,
                       "--max-new-tokens", str(NEW_TOKENS), "--json")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    (root / "gen_tp2.json").write_text(proc.stdout.strip().splitlines()[-1])
    return root


def imported_roots(folder) -> set[str]:
    """Top-level packages that the .py files of `folder` import (relative imports excluded)."""
    roots = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


def cli_json(capsys, *argv: str) -> dict:
    assert generate.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_tp2_equals_tp1_and_cache_equals_recompute(runs, capsys, sample_data):
    """Greedy tokens: torchrun at TP 2 == one plain process (TP 1) reading the same TP-2 weights (resharded as they
    are loaded) == the TP-1 copy read as written == without the KV cache."""
    tp2 = json.loads((runs / "gen_tp2.json").read_text())
    tp1_from_tp2 = cli_json(capsys, "--ckpt", str(runs / "untrained"), "--prompt", PROMPT, "--max-new-tokens",
                            str(NEW_TOKENS), "--json")
    tp1 = cli_json(capsys, "--ckpt", str(runs / "untrained_tp1"), "--prompt", PROMPT, "--max-new-tokens",
                   str(NEW_TOKENS), "--json")
    no_cache = cli_json(capsys, "--ckpt", str(runs / "untrained_tp1"), "--prompt", PROMPT, "--max-new-tokens",
                        str(NEW_TOKENS), "--json", "--no-cache")
    assert tp2["tokens"] == tp1_from_tp2["tokens"] == tp1["tokens"] == no_cache["tokens"]
    assert len(tp1["tokens"]) == NEW_TOKENS and len(set(tp1["tokens"])) > 3  # a real sequence, not a repeat
    assert tp1["text"] == generate.Tokenizer(sample_data / "tokenizer.model").decode(tp1["tokens"])
    assert tp1["tokens_per_s"] > 0
    # sampling: reproducible from the seed, and different from greedy
    sampled = [cli_json(capsys, "--ckpt", str(runs / "untrained_tp1"), "--prompt", PROMPT, "--max-new-tokens", "12",
                        "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "7", "--json")["tokens"]
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != tp1["tokens"][:12]


def test_kv_cache_in_chunks_equals_full_forward(runs):
    from tokenformer_dist.model.attention import KVCache

    model = generate.load_model(runs / "untrained_tp1")
    tokens = torch.randint(0, 8192, (2, 20), generator=torch.Generator().manual_seed(3))
    cache = KVCache(model.cfg.n_layers, 20)
    with torch.no_grad():
        chunks = [model(part, cache=cache) for part in tokens.split([8, 1, 6, 5], dim=1)]  # prefill, 1, several
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(tokens), rtol=0, atol=1e-5)
    assert cache.get_seq_length(0) == 20
    with pytest.raises(ValueError, match="KV cache holds 20"):
        model(tokens[:, :1], cache=cache)


def test_generate_stops_at_end_of_document(runs):
    model = generate.load_model(runs / "untrained_tp1")
    eod = 2
    with torch.no_grad():  # make </s> the most likely next token everywhere: logits = E·E[eod]
        model.embedding.weight[eod] *= 10
        model.final_norm.weight.zero_()
        model.final_norm.bias.copy_(model.embedding.weight[eod])
    assert generate.generate_ids(model, [5, 6, 7], 10, eod_id=eod) == [eod]
    assert generate.generate_ids(model, [5, 6, 7], 10, eod_id=None) == [eod] * 10


def test_generate_bad_input(runs, capsys, tmp_path):
    ckpt = ["--ckpt", str(runs / "untrained_tp1"), "--prompt", "x"]
    for argv, needle in ((["--ckpt", str(tmp_path / "missing"), "--prompt", "x"], "missing"),
                         ([*ckpt, "--temperature", "-1"], "--temperature"),
                         ([*ckpt, "--top-p", "0"], "--top-p"),
                         ([*ckpt, "--tp", "2"], "torchrun --nproc_per_node"),
                         ([*ckpt, "--tokenizer", str(tmp_path / "none.model")], "--tokenizer")):
        assert generate.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    from tokenformer_dist.inference.hf.export import export_hf

    root = tmp_path_factory.mktemp("hf")
    return {name: export_hf(runs / name, root / name) for name in ("trained", "untrained")}


def test_export_matches_the_project_model(runs, exported, sample_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenformer_dist.data import TokenShards
    from tokenformer_dist.inference.evaluate import evaluate

    folder = exported["trained"]
    assert not imported_roots(folder) & {"megatron", "deepspeed", "tokenformer_dist"}  # torch + transformers only
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ours = generate.load_model(runs / "trained_tp1")
    assert type(hf.model).__module__.startswith("transformers_modules")  # the folder's copy, not the package
    tokens = torch.randint(0, 8192, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    # val loss over the first 32 windows, as tokenformer_dist.evaluate computes it
    seq = read_config(runs / "trained").model.seq_len
    want = evaluate(ours, str(sample_data), seq, micro_batch=8, max_batches=4)
    shards = TokenShards(sample_data, "val")
    windows = torch.from_numpy(np.stack([shards.window(i, seq) for i in range(32)]).astype(np.int64))
    with torch.no_grad():
        losses = [hf(input_ids=w, labels=w).loss.item() for w in windows.split(8)]
    assert want["tokens"] == 32 * seq
    assert math.isclose(sum(losses) / len(losses), want["loss"], rel_tol=1e-6)
    # the same model through the HF meta path: same tokenizer ids, same greedy tokens as the generate CLI
    tok = AutoTokenizer.from_pretrained(exported["untrained"], trust_remote_code=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == generate.Tokenizer(sample_data / "tokenizer.model").encode(PROMPT)
    # generate() in a fresh interpreter, as a user runs it
    code = ("import json, sys, torch; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); ids = torch.tensor([json.loads("
            "sys.argv[2])]); print(json.dumps(m.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)"
            "[0, ids.shape[1]:].tolist()))")
    proc = subprocess.run([sys.executable, "-c", code, str(exported["untrained"]), json.dumps(ids[0].tolist()),
                           str(NEW_TOKENS)], capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == json.loads((runs / "gen_tp2.json").read_text())["tokens"]
    assert "trust_remote_code=True" in (folder / "README.md").read_text()


def test_hf_generate_feeds_the_cache_back():
    """Every step of HF generate() sees the KV cache of the steps before: its per-step logits equal one full
    forward without a cache. (transformers 5.24 renamed `past_key_values` to `cache`; a model that read only the
    old name got a fresh cache each step and went wrong from the second generated token, 2.8 logits off.)"""
    from tokenformer_dist.inference.hf.configuration_tokenformer import TokenFormerConfig
    from tokenformer_dist.inference.hf.modeling_tokenformer import TokenFormerForCausalLM

    torch.manual_seed(0)
    cfg = TokenFormerConfig(d_model=32, n_layers=2, n_heads=4, seq_len=64, vocab_size=97, qkv_tokens=8,
                            proj_tokens=8, ffn_tokens=16, eod_id=96)
    model = TokenFormerForCausalLM(cfg).eval()
    for p in model.parameters():  # large random weights: a varied, non-repeating greedy sequence
        torch.nn.init.normal_(p, std=0.5)
    prompt = torch.tensor([[5, 17, 33, 2, 9, 60, 61, 3]])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    assert len(set(out.sequences[0, prompt.shape[1]:].tolist())) > 2
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[0, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack([step[0] for step in out.logits]), full, rtol=1e-4, atol=1e-4)


def test_lm_eval_runs_and_training_helps(exported, sample_data, tmp_path, monkeypatch):
    from lm_eval.__main__ import cli_evaluate

    from tokenformer_dist.inference.hf.lm_eval_task import TASK, write_continuation_task

    tasks = write_continuation_task(sample_data, tmp_path / "tasks")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    acc = {}
    for name, folder in exported.items():
        out = tmp_path / f"results_{name}"
        monkeypatch.setattr(sys, "argv", [
            "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
            "--include_path", str(tasks), "--tasks", TASK, "--device", "cpu", "--batch_size", "16",
            "--output_path", str(out)])
        cli_evaluate()
        (result,) = out.rglob("results_*.json")
        acc[name] = json.loads(result.read_text())["results"][TASK]["acc,none"]
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["trained"] > acc["untrained"], acc


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "deepspeed"])
def test_import_official_checkpoint(tmp_path, layout):
    from tokenformer_dist.checkpoint.official import main as import_main

    cfg = neox_config(d=64, layers=2, heads=4, qkv=32, proj=32, ffn=128, seq=64)
    state = random_official_state(cfg, vocab=128)
    if layout == "pytorch_model.bin":  # the published Pile models: fp32, config passed separately
        (tmp_path / "TokenFormer-tiny").mkdir()
        torch.save(state, tmp_path / "TokenFormer-tiny" / "pytorch_model.bin")
        src, extra = tmp_path / "TokenFormer-tiny", ["--config", str(write_neox_yaml(tmp_path / "tiny_eval.yml", cfg))]
    else:  # a GPT-NeoX DeepSpeed save dir (the OWT 354M model): fp16 layer files, configs inside
        src, extra = write_deepspeed_layout(tmp_path / "354M" / "checkpoints", state, cfg), []
        state = {k: v.half() for k, v in state.items()}
    assert import_main(["--ckpt", str(src), "--out", str(tmp_path / "out"), "--tp", "1", *extra]) == 0
    model = generate.load_model(tmp_path / "out")
    taus = {n: float(b) for n, b in model.named_buffers() if n.endswith("tau")}
    assert taus["blocks.0.attn.query.tau"] == pytest.approx(math.sqrt(32), rel=1e-7)  # τ = √n, recorded
    assert taus["blocks.1.ffn.tau"] == pytest.approx(math.sqrt(128), rel=1e-7)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), official_logits(state, cfg, tokens), rtol=0, atol=1e-5)
    assert resolve_checkpoint(tmp_path / "out") == tmp_path / "out"


def test_import_official_refuses_other_architectures(tmp_path, capsys):
    from tokenformer_dist.checkpoint.official import main as import_main

    cfg = {**neox_config(d=64, layers=2, heads=4, qkv=32, proj=32, ffn=128, seq=64), "norm": "layernorm"}
    (tmp_path / "m").mkdir()
    torch.save(random_official_state(cfg, vocab=128), tmp_path / "m" / "pytorch_model.bin")
    write_neox_yaml(tmp_path / "m" / "eval.yml", cfg)
    assert import_main(["--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norm = 'layernorm'" in err[0], err
    assert not (tmp_path / "out").exists()
