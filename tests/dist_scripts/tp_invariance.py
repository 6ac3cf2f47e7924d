"""Run under torchrun with 4 processes: the same master weights at TP 1, 2 and 4 (one world, re-grouped).

For each normalization and TP degree, rank 0 saves the full logits, the loss and the gradients of every
gathered parameter to OUT/tp{tp}_{norm}.pt; the test compares them. First, before anything imports
megatron-core, the plain single-device model (no process group, no parallelize) saves OUT/tp0_{norm}.pt and
the report records which megatron modules it imported (none allowed). Also checks the clear error when the
(sequence, head) pairs cannot be partitioned, and the built model's parameter count.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.dist import TINY_MODEL
from tokenformer_dist.config import ModelConfig, param_count
from tokenformer_dist.model import TokenFormer

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
out = Path(sys.argv[1])
# 6 heads: not divisible by TP 4; micro-batch 2 gives 12 (sequence, head) pairs, which TP 4 can split.
cfg = ModelConfig(**TINY_MODEL)
gen = torch.Generator().manual_seed(7)
tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=gen)
report = {}


def set_norm(norm: str) -> None:
    cfg.norm = norm
    # At the official init a softmax-normalized Pattention outputs almost the same vector for every
    # input (softmax of near-zero scores is flat), so its Q/K gradients are ~1e-5 of the others and
    # pure fp32 cancellation noise; a wider key init makes the comparison measure TP, not rounding.
    cfg.init_std = 0.15 if norm == "softmax" else 0.02


def single_device(rank: int) -> None:
    """The plain model on its own: torch only, no process group, no megatron-core."""
    for norm in NORMS:
        set_norm(norm)
        model = TokenFormer(cfg, seed=11)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if rank == 0:
            torch.save({"logits": model(tokens[:, :-1]).detach(), "loss": loss.detach(),
                        "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()}},
                       out / f"tp0_{norm}.pt")
    report["megatron_modules_of_plain_model"] = sorted(m for m in sys.modules if m.startswith("megatron"))


def tensor_parallel() -> None:
    from megatron.core import parallel_state

    from tokenformer_dist.distributed.launch import destroy_distributed, init_distributed
    from tokenformer_dist.model import parallelize
    from tokenformer_dist.model.tensor_parallel import build_parallel_model

    def gathered(t: torch.Tensor, sharded: bool) -> torch.Tensor:
        if not sharded or parallel_state.get_tensor_model_parallel_world_size() == 1:
            return t
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(t) for _ in range(group.size())]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    for tp in (1, 2, 4):
        info = init_distributed(tp)
        group = parallel_state.get_tensor_model_parallel_group()
        for norm in NORMS:
            set_norm(norm)
            model = parallelize(TokenFormer(cfg, seed=11), group)
            built = build_parallel_model(cfg, group, seed=11)  # never allocates the whole model
            built_sd, tp_attrs = built.state_dict(), lambda m: {  # what DeepSpeed's grad norm reads
                k: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None))
                for k, p in m.named_parameters()}
            same = torch.tensor(float(built_sd.keys() == model.state_dict().keys() and all(
                torch.equal(t, built_sd[k]) for k, t in model.state_dict().items())
                and tp_attrs(built) == tp_attrs(model)))
            dist.all_reduce(same, op=dist.ReduceOp.MIN)  # every rank's shards
            report[f"built_equals_parallelized_tp{tp}_{norm}"] = bool(same.item())
            logits = model(tokens[:, :-1])
            loss = model.token_losses(logits, tokens[:, 1:]).mean()
            loss.backward()
            full_logits = model.gather_logits(logits)
            grads, n_params = {}, 0
            for name, p in model.named_parameters():
                g = gathered(p.grad, getattr(p, "tensor_model_parallel", False))
                grads[name] = g.detach().clone()
                n_params += g.numel()
            if info.rank == 0:
                torch.save({"logits": full_logits.detach(), "loss": loss.detach(), "grads": grads},
                           out / f"tp{tp}_{norm}.pt")
                report[f"params_tp{tp}"] = n_params
        if tp == 4:
            try:
                parallelize(TokenFormer(cfg, seed=11), group)(tokens[:1, :-1])
                report["pair_error"] = None
            except ValueError as e:
                report["pair_error"] = str(e)
        parallel_state.destroy_model_parallel()  # keep the process group, re-group at the next TP

    report["analytic_params"] = param_count(cfg)
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report))
    destroy_distributed()


single_device(int(__import__("os").environ["RANK"]))
tensor_parallel()
