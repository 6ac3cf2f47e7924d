"""Tensor parallelism for a plain TokenFormer, as one explicit step (as torchtitan's `parallelize`):

    model = parallelize(TokenFormer(cfg, seed=...), tp_group)
    model = build_parallel_model(cfg, tp_group, seed=...)      # the same, never allocating the whole model

Everything megatron-core lives here: its mappings (called with `group=`), `VocabParallelEmbedding`
(`tp_group=`), its vocab-parallel cross-entropy arithmetic (on the explicit group) and the
`tensor_model_parallel` attributes DeepSpeed reads. No megatron global state is read: the TP group is passed
in. The step
  - keeps this rank's rows of every TP-sharded tensor (which ones, and on which dim: `sharding.RULES`),
  - replaces the embedding by a VocabParallelEmbedding holding those rows (state_dict name unchanged),
  - gives every Pattention the group (its normalizer all-reduce) and binds every module's `tp` regions.
Slicing a master-initialized model keeps the TP-invariant init: rank r gets rows r of the same full tensors.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.utils import VocabUtility

from tokenformer_dist.config import ModelConfig
from tokenformer_dist.distributed.sharding import is_tp_sharded, local_part, rule_for
from tokenformer_dist.model.mappings import TensorParallelRegions
from tokenformer_dist.model.pattention import Pattention
from tokenformer_dist.model.tokenformer import TokenFormer


class MegatronRegions(TensorParallelRegions):
    """The region borders on an explicit TP group, through megatron-core's named autograd mappings."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.size, self.rank = group, group.size(), group.rank()

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(x, group=self.group)

    def reduce_from(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(x, group=self.group)

    def reduce_scatter_first_dim(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_to_sequence_parallel_region(x, group=self.group)

    def gather_first_dim(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.group)

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_model_parallel_region(x, group=self.group)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return super().token_losses(logits, labels)
        # megatron's formula overwrites its input with softmax in place (and .float() of fp32 logits is the
        # same tensor): copy, so that callers keep their logits
        return _VocabParallelCrossEntropy.apply(logits.to(torch.float32, copy=True), labels, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """megatron-core's vocab-parallel cross entropy (its `VocabParallelCrossEntropy` arithmetic), with the
    three all-reduces on an explicit group: megatron's own `vocab_parallel_cross_entropy` reads the global
    TP group."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, group):
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(vocab_parallel_logits)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(logits.size(-1), group.rank(),
                                                                            group.size())
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(logits, target, logits_max, start, end))
        dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        exp_logits, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(exp_logits, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask))
        grad_input = VocabParallelCrossEntropy.calculate_gradients(grad_2d, arange_1d, masked_target_1d,
                                                                   softmax_update, grad_input, grad_output)
        return grad_input, None, None


@torch.no_grad()
def _keep_local_rows(model: torch.nn.Module, rank: int, size: int) -> None:
    """Replace every TP-sharded parameter by this rank's part of it (a copy: the full tensor is freed)."""
    for name, p in list(model.named_parameters()):
        if not is_tp_sharded(name):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        local = torch.nn.Parameter(local_part(name, p.detach(), rank, size).clone(), requires_grad=p.requires_grad)
        setattr(owner, attr, local)


def mark_tp_attributes(model: torch.nn.Module) -> None:
    """Set megatron's `tensor_model_parallel` / `partition_dim` attributes (what DeepSpeed's gradient norm
    and megatron's helpers read) on every sharded parameter, from the sharding table. Parameters replaced
    by `Module.to_empty` lose them, so this runs again after materializing."""
    for name, p in model.named_parameters():
        rule = rule_for(name)
        if rule.dim is not None:
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=rule.dim, stride=1)


M = TypeVar("M", bound=torch.nn.Module)


def parallelize(model: M, tp_group: dist.ProcessGroup) -> M:
    """Shard `model` (a TokenFormer, or a part of one such as a block, built whole on one device) over
    `tp_group` in place and return it.

    Every rank of the group must call it on the same model (same config and seed). Raises ValueError when a
    sharded tensor's rows do not divide by the group size.
    """
    regions = MegatronRegions(tp_group)
    _keep_local_rows(model, regions.rank, regions.size)
    if isinstance(model, TokenFormer):
        local = model.embedding.weight  # this rank's vocabulary rows
        mp_config = ModelParallelConfig(tensor_model_parallel_size=regions.size, use_cpu_initialization=True,
                                        perform_initialization=False, params_dtype=local.dtype)
        model.embedding = VocabParallelEmbedding(model.cfg.vocab_size, model.cfg.d_model,
                                                 init_method=torch.nn.init.zeros_, config=mp_config,
                                                 tp_group=tp_group)
        model.embedding.weight = local
    mark_tp_attributes(model)
    for module in model.modules():
        if isinstance(getattr(module, "tp", None), TensorParallelRegions):
            module.tp = regions
        if isinstance(module, Pattention):
            module.tp_group = tp_group if regions.size > 1 else None
    return model


def build_parallel_model(cfg: ModelConfig, tp_group: dist.ProcessGroup, *, seed: int = 1234,
                         activation_checkpointing: bool = False, init_weights: bool = True,
                         device: torch.device | str = "cpu") -> TokenFormer:
    """`parallelize(TokenFormer(cfg, seed=seed), tp_group)` without ever allocating the whole model: built on
    the meta device, sharded, then only this rank's parts are allocated on `device` and initialized (the same
    master weights: each full tensor drawn per name, this rank's rows kept). `init_weights=False`: zeros,
    for weights that are loaded next."""
    with torch.device("meta"):
        model = TokenFormer(cfg, seed=seed, activation_checkpointing=activation_checkpointing, init_weights=False)
    parallelize(model, tp_group)
    model.to_empty(device=device)
    mark_tp_attributes(model)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_constants"):  # τ and rotary frequencies: buffers to_empty left blank
                module.reset_constants()
        if init_weights:
            model.init_weights(seed)
        else:
            for p in model.parameters():
                p.zero_()
    return model
