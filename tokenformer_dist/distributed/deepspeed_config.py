"""The DeepSpeed engine configuration the trainer uses (ZeRO stage, bf16 and its gradient dtypes, buckets)."""

from __future__ import annotations

from typing import Any

from tokenformer_dist.config import Config


def deepspeed_config(cfg: Config, dp: int, bf16: bool, universal: bool, on_gpu: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict.

    bf16 (read in DeepSpeed 0.19.8's engine.py, bf16_optimizer.py, zero/stage_1_and_2.py, zero/stage3.py):
    `communication_data_type` is the dtype of the DP gradient reduction at every stage (the engine's
    allreduce_bucket at stage 0, the ZeRO optimizer's buckets at stages 1/2, the reduce-scatter at stage 3);
    it defaults to bf16 when bf16 is on. `data_types.grad_accum_dtype` = fp32 is honoured at stage 1 (it
    selects BF16_Optimizer, whose gradient buffers are fp32 — but which has no gradient hooks: its fp32
    all-reduce runs after the whole backward, and overlap_comm, contiguous_gradients and the bucket size are
    ignored) and stage 3 (fp32 gradient partitions); stage 2 keeps its gradient partition in the parameter
    dtype whatever it says, and stage 0 (no ZeRO) rejects a bf16/fp32 mix. So it is set at stage 3, and at
    stage 1 only when there is something to accumulate (grad_accum_steps > 1): with one micro-batch per step
    the ZeRO optimizer's bf16 gradients are reduced in fp32 all the same, overlapped with the backward.

    DeepSpeed's throughput timer is switched off: on by default with `synchronized: true`, it calls
    torch.cuda.synchronize() at the start of every forward and at every step (utils/timer.py), and the
    trainer measures tokens/s itself.
    """
    t, p = cfg.train, cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage > 0:
        zero.update({
            # overlap needs a side stream: GPU only (on CPU DeepSpeed's accelerator has none)
            "overlap_comm": p.overlap_comm and on_gpu,
            "contiguous_gradients": p.contiguous_gradients,
            "reduce_bucket_size": p.reduce_bucket_size,
            "allgather_bucket_size": p.allgather_bucket_size,
        })
    if p.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = p.allgather_bucket_size
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "checkpoint": {"load_universal": universal},
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if bf16:
        out["communication_data_type"] = p.grad_reduce_dtype
        if p.grad_reduce_dtype == "fp32" and (p.zero_stage == 3 or p.zero_stage == 1 and t.grad_accum_steps > 1):
            out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out
