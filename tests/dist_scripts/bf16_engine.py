"""Run under torchrun with 2 processes (TP 1 × DP 2): what the trainer's DeepSpeed engine really does in bf16.

usage: bf16_engine.py DATA OUT CASES_JSON   CASES_JSON: [[name, zero_stage, mutation or null], ...]

Each case is one real `trainer.train` run of one step on DATA (ZeRO `zero_stage`, `parallel.dtype=bf16`), in
this one launch. The engine the trainer built is kept (a spy around `trainer.build_engine`), and every
reduction issued inside its backward and step is recorded at the dispatcher (the c10d ops themselves, so
whatever DeepSpeed calls them through). OUT/bf16_engine.json gets, per case, what rank 0 saw: the module's
parameter dtypes, the dtypes of the parameters the torch optimizer updates (the master weights),
DeepSpeed's optimizer class, `communication_data_type`, the gradient accumulation dtype, and the elements
reduced per dtype. tests/test_bf16_engine.py compares them with what
tokenformer_dist/distributed/deepspeed_config.py promises.

A mutation rewrites the DeepSpeed config the trainer asks for (the bugs the test must catch):
  bf16_off:          "bf16": {"enabled": false} while the run's config says bf16;
  reduce_in_bf16:    no communication_data_type (DeepSpeed then reduces gradients in bf16).
"""

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.dist_scripts.train_helpers import train_argv
from tokenformer_dist.distributed.launch import destroy_distributed
from tokenformer_dist.training import trainer
from tokenformer_dist.training.cli import parse_args, resolve_config

REDUCTIONS = {"allreduce_", "allreduce_coalesced_", "reduce_", "reduce_scatter_", "_reduce_scatter_base_",
              "reduce_scatter_tensor_coalesced_"}


def _mutate(ds: dict[str, Any], mutation: str | None) -> dict[str, Any]:
    if mutation == "bf16_off":
        ds["bf16"] = {"enabled": False}
    elif mutation == "reduce_in_bf16":
        ds.pop("communication_data_type", None)
    elif mutation is not None:
        raise ValueError(f"unknown mutation {mutation!r}")
    return ds


class ReductionRecorder(TorchDispatchMode):
    """Counts the elements of every c10d reduction by dtype (the input buffers: what goes over the wire)."""

    def __init__(self, seen: Counter) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func.__name__.split(".")[0] in REDUCTIONS:
            # the op's largest tensor: the buffer reduced (a reduce-scatter's input, or its output: same dtype)
            largest = max((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), key=torch.numel)
            if largest.numel() > 1:  # not the scalar norm/overflow reductions
                self.seen[str(largest.dtype)] += largest.numel()
        return func(*args, **(kwargs or {}))


def _recorded(fn, seen: Counter):
    def wrapper(*args, **kwargs):
        with ReductionRecorder(seen):
            return fn(*args, **kwargs)
    return wrapper


def engine_facts(engine: Any, reduced: Counter) -> dict[str, Any]:
    module_params = list(engine.module.parameters())
    # ZeRO 3 leaves an empty placeholder in `param.data`; the rank's partition is `ds_tensor`
    stored = [getattr(p, "ds_tensor", p) for p in module_params]
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in module_params)
    # the tensors torch's AdamW stepped (it keeps state for each): the master weights, whatever the wrapper
    masters = list(engine.basic_optimizer.state)
    return {
        "optimizer": type(engine.optimizer).__name__,
        "param_dtypes": sorted({str(p.dtype) for p in stored}),
        "master_dtypes": sorted({str(p.dtype) for p in masters}),
        "communication_data_type": str(engine.communication_data_type),
        "grad_accum_dtype": str(engine.get_data_types()[1]),
        "reduced": dict(reduced),
        "n_params": n_params,
    }


def main() -> None:
    data, out, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    real_build, real_ds_config = trainer.build_engine, trainer.deepspeed_config
    results = {}
    for name, stage, mutation in cases:
        built: list[Any] = []
        reduced: Counter = Counter()

        def spy_build(*args, _built=built, _reduced=reduced, **kwargs):
            engine = real_build(*args, **kwargs)
            engine.backward = _recorded(engine.backward, _reduced)
            engine.step = _recorded(engine.step, _reduced)
            _built.append(engine)
            return engine

        trainer.build_engine = spy_build
        trainer.deepspeed_config = lambda *a, _m=mutation, **k: _mutate(real_ds_config(*a, **k), _m)
        argv = train_argv(data, out / name, 1, tp=1, zero=stage, **{
            "parallel.dtype": "bf16", "model.seq_len": 16, "train.micro_batch_size": 2, "train.eval_batches": 1})
        args = parse_args(argv)
        assert trainer.train(args, resolve_config(args), destroy=False) == 0
        (engine,) = built
        results[name] = engine_facts(engine, reduced)
        del built[:], engine
    if dist.get_rank() == 0:
        tmp = out / "bf16_engine.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.rename(out / "bf16_engine.json")
    destroy_distributed()


main()
