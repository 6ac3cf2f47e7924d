"""Run under torchrun with 4 processes: expand/reshard trainer checkpoints and compare the functions.

usage: expand_check.py OUT DATA CASES_JSON
Each case {"name", "src", "dst", "dst_tp", "tokens" (null: pure reshard), "init"} is expanded by rank 0 with
`expand_checkpoint`, then the source model (at its own TP) and the expanded one (at dst_tp) are evaluated on
a fixed batch and on the val split. For growth cases, also the gradients of the new rows over two SGD steps.
Rank 0 writes OUT/results.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tokenformer_dist.checkpoint.engine import checkpoint_tp, read_config, resolve_checkpoint
from tokenformer_dist.checkpoint.weights import load_weights
from tokenformer_dist.distributed.launch import destroy_distributed, init_distributed
from tokenformer_dist.growth.expand import expand_checkpoint
from tokenformer_dist.growth.tokens import token_kind, with_counts
from tokenformer_dist.inference.evaluate import evaluate
from tokenformer_dist.model import TokenFormer, parallelize

out, data, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo")
tokens = torch.randint(0, 8192, (4, 65), generator=torch.Generator().manual_seed(5))
results = {}


def regroup(tp: int) -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(tp)


def load(path: str) -> TokenFormer:
    path = str(resolve_checkpoint(path))
    regroup(checkpoint_tp(path))
    model = TokenFormer(read_config(path).model, seed=999)  # a different init: everything must be loaded
    model = parallelize(model, parallel_state.get_tensor_model_parallel_group())
    load_weights(model, path)
    return model


def function_of(model: TokenFormer) -> dict:
    with torch.no_grad():
        logits = model.gather_logits(model(tokens[:, :-1]))
    return {"logits": logits, "val": evaluate(model, data, 64, 4, max_batches=4)["loss"]}


def new_row_grads(model: TokenFormer, old_counts: dict) -> list[dict]:
    """|grad| of the appended key and value rows over two plain SGD steps (step 1: only keys can move)."""
    new_rows = []
    for name, p in model.named_parameters():
        kind = token_kind(name)
        if kind and kind[1] != "tau":
            n_old = old_counts[kind[0]]
            start = max(n_old - parallel_state.get_tensor_model_parallel_rank() * p.shape[0], 0)
            new_rows.append((name, p, min(start, p.shape[0])))
    steps = []
    for _ in range(2):
        model.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        sums = {"key": 0.0, "value": 0.0}
        for name, p, start in new_rows:
            sums["key" if name.endswith("key_tokens") else "value"] += p.grad[start:].abs().sum().item()
        totals = torch.tensor([sums["key"], sums["value"]])
        dist.all_reduce(totals)
        steps.append({"key": totals[0].item(), "value": totals[1].item()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.5)
    return steps


for case in cases:
    src_cfg = read_config(case["src"])
    if dist.get_rank() == 0:
        counts = case["tokens"] or {"qkv": src_cfg.model.qkv_tokens, "proj": src_cfg.model.proj_tokens,
                                    "ffn": src_cfg.model.ffn_tokens}
        target = with_counts(src_cfg, counts, case["dst_tp"], case["name"])
        expand_checkpoint(case["src"], case["dst"], case["dst_tp"], target, case["init"], seed=3, progress=False)
    dist.barrier()
    before = function_of(load(case["src"]))
    model = load(case["dst"])
    after = function_of(model)
    res = {
        "logits_rel_err": ((after["logits"] - before["logits"]).norm() / before["logits"].norm()).item(),
        "val_before": before["val"], "val_after": after["val"],
        "src_tp": checkpoint_tp(resolve_checkpoint(case["src"])), "dst_tp": checkpoint_tp(case["dst"]),
    }
    if case["tokens"] and case["init"] == "exact":
        old = {"qkv": src_cfg.model.qkv_tokens, "proj": src_cfg.model.proj_tokens, "ffn": src_cfg.model.ffn_tokens}
        res["new_row_grads"] = new_row_grads(model, old)
    results[case["name"]] = res

if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results, indent=1))
destroy_distributed()
