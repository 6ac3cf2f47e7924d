"""bf16 is on by construction: the DeepSpeed engine the trainer builds, inspected while it trains, per ZeRO stage.

One 2-process launch (TP 1 × DP 2, ≈ 25 s) runs one real training step per case (tests/dist_scripts/
bf16_engine.py) and reports what the engine holds and what its backward and step reduced. The loss-level
bf16 tests (test_train.py) cannot tell bf16 from fp32 with bf16 switched off; these checks can. Two
deliberate bugs in the DeepSpeed config are kept as cases that must make the checks fire.
"""

from __future__ import annotations

import json

import pytest

from tests.dist import DIST_SCRIPTS, torchrun

# What tokenformer_dist/distributed/deepspeed_config.py asks DeepSpeed for in bf16 (default
# parallel.grad_reduce_dtype fp32), per ZeRO stage: DeepSpeed's optimizer class and the dtype gradients
# accumulate in. When deepspeed_config.py changes
# what a stage uses, change its line here (and only here).
EXPECTED = {
    0: ("FP16_UnfusedOptimizer", "torch.bfloat16"),  # no ZeRO: DeepSpeed refuses bf16 params + fp32 accumulation
    # one micro-batch per step (grad_accum_steps 1): no grad_accum_dtype, so the ZeRO optimizer — bf16 gradients
    # reduced in fp32 from its hooks; with accumulation distributed/deepspeed_config.py sets fp32 and DeepSpeed
    # takes BF16_Optimizer
    1: ("DeepSpeedZeroOptimizer", "torch.bfloat16"),
    2: ("DeepSpeedZeroOptimizer", "torch.bfloat16"),  # stage 2 keeps its gradient partition in the param dtype
    3: ("DeepSpeedZeroOptimizer_Stage3", "torch.float32"),  # fp32 gradient partitions
}
PARAM_DTYPE, MASTER_DTYPE, REDUCE_DTYPE = "torch.bfloat16", "torch.float32", "torch.float32"
# deliberate bugs: (stage, mutation in bf16_engine.py) -> the check that must fire
MUTATIONS = {(1, "bf16_off"): "param_dtypes", (3, "bf16_off"): "param_dtypes",
             (0, "reduce_in_bf16"): "reduced", (2, "reduce_in_bf16"): "reduced"}


def _case(stage: int, mutation: str | None) -> str:
    return f"zero{stage}" + (f"_{mutation}" if mutation else "")


def bf16_problems(facts: dict, stage: int) -> dict[str, str]:
    """{check: what was seen} for every way the engine differs from a bf16 engine with fp32 master weights,
    fp32 gradient reduction and the stage's optimizer and accumulation dtype; {} if none."""
    optimizer, accum = EXPECTED[stage]
    bad = {}
    if facts["optimizer"] != optimizer:
        bad["optimizer"] = f"{facts['optimizer']}, expected {optimizer}"
    if facts["param_dtypes"] != [PARAM_DTYPE]:
        bad["param_dtypes"] = f"{facts['param_dtypes']}, expected [{PARAM_DTYPE}]"
    if facts["master_dtypes"] != [MASTER_DTYPE]:
        bad["master_dtypes"] = f"{facts['master_dtypes']}, expected [{MASTER_DTYPE}]"
    if facts["communication_data_type"] != REDUCE_DTYPE:
        bad["communication_data_type"] = f"{facts['communication_data_type']}, expected {REDUCE_DTYPE}"
    if facts["grad_accum_dtype"] != accum:
        bad["grad_accum_dtype"] = f"{facts['grad_accum_dtype']}, expected {accum}"
    # every gradient element went through a reduction, and every reduction was in the reduction dtype
    reduced = facts["reduced"]
    if set(reduced) != {REDUCE_DTYPE} or reduced[REDUCE_DTYPE] < facts["n_params"]:
        bad["reduced"] = f"elements reduced per dtype {reduced}, expected >= {facts['n_params']} all {REDUCE_DTYPE}"
    return bad


@pytest.fixture(scope="module")
def engines(sample_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bf16_engine")
    cases = [[_case(s, None), s, None] for s in EXPECTED] + [[_case(s, m), s, m] for s, m in MUTATIONS]
    torchrun(DIST_SCRIPTS / "bf16_engine.py", 2, str(sample_data), str(out), json.dumps(cases))
    return json.loads((out / "bf16_engine.json").read_text())


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_engine_is_bf16_with_fp32_master_weights_and_reduction(engines, stage):
    assert bf16_problems(engines[_case(stage, None)], stage) == {}


@pytest.mark.parametrize("stage, mutation", sorted(MUTATIONS))
def test_the_check_fires_on_a_broken_deepspeed_config(engines, stage, mutation):
    assert MUTATIONS[stage, mutation] in bf16_problems(engines[_case(stage, mutation)], stage)
