"""Layout planner: per-GPU memory, step time, tokens/s and MFU of every (TP, DP, ZeRO, micro-batch,
grad-accum, activation checkpointing) layout of a config on a cluster, and the fastest layout that fits.

Every term is derived from what the code does (tokenformer_dist/model/*, DeepSpeed's ZeRO optimizer as the
trainer configures it); `bench/bench_plan.py` checks the memory terms against real CPU training steps.

Memory per GPU (bytes), with P = parameters on this rank (TP-sharded), w = bytes of the model dtype
(bf16 2 on a GPU, fp32 4 on CPU), dp = data-parallel size:
  weights     P·w                        (ZeRO 3: P·w/dp plus the gathered layer being computed)
  grads       P·g, ZeRO 2/3: P·g/dp      (g = w, DeepSpeed's default; 4 with parallel.grad_reduce_dtype fp32)
  optimizer   fp32 master P·4 + AdamW m, v P·8; divided by dp for ZeRO >= 1 (ZeRO 0 fp32 has no master)
  bucket      DeepSpeed ZeRO 1/2 allocate a contiguous gradient bucket of reduce_bucket_size elements
              (5e8 by default) in the gradient dtype at the first gradient hook of every step (x2 with
              overlap_comm); ZeroSettings / `zero_settings(cfg)` read these from the config when present
  activations per micro-batch, T = micro_batch·seq tokens (see `activation_elements_per_token`)
  workspace   GPU: CUDA context, cuBLAS and NCCL buffers (a constant per GPU kind); transients of the loss
              head, a block's backward and the optimizer step are part of the phase peaks below
The peak is the largest of the phases: end of forward; the loss head's backward; the blocks' backward (all
activations, the bucket, a block's backward buffers); the end of backward (all gradients plus the tied
embedding's gradient sum); the optimizer step.

Step time = compute + exposed communication:
  compute     matmul FLOPs (model/flops.py flops_per_token; + one forward with checkpointing) at an achievable
              fraction of the dense bf16 peak, plus the elementwise passes over [tokens, n] tensors that the
              lean Pattention makes (memory-bound: bytes at an achievable fraction of HBM bandwidth)
  TP comm     `tp_layer_comm_bytes` (the formula bench/bench_tp_comm.py verifies) over NVLink, in the
              compute stream (exposed), plus a latency per collective
  DP comm     ZeRO 0 all-reduce / ZeRO 1-2 reduce-scatter of gradients + all-gather of updated weights /
              ZeRO 3 also two weight all-gathers per micro-batch, over NVLink (one node) or InfiniBand;
              overlap assumptions in `dp_comm_seconds`
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass
from typing import NoReturn

from tokenformer_dist.config import Config, ModelConfig, parameter_tokens_per_layer, pattention_params_per_layer
from tokenformer_dist.model.flops import flops_per_token, forward_flops_per_token

GB = 1e9
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Hardware:
    """One accelerator kind. Bandwidths are per GPU, one direction, as NCCL bus bandwidth achievable."""

    name: str
    memory: float  # bytes per device
    peak_flops: float  # dense bf16 (training/metrics.py PEAK_BF16_FLOPS); CPU: nominal fp32
    matmul_efficiency: float  # achievable fraction of peak_flops for large matmuls
    hbm_bandwidth: float  # bytes/s
    hbm_efficiency: float  # achievable fraction for streaming elementwise kernels
    nvlink_bandwidth: float  # inside a node (bytes/s)
    ib_bandwidth: float  # between nodes, per GPU (bytes/s)
    latency: float  # seconds per collective call
    workspace: float  # bytes: CUDA context + cuBLAS workspace + NCCL buffers
    dtype_bytes: int  # model dtype the trainer uses there: bf16 on GPU ("auto"), fp32 on CPU
    fused_adam: bool  # the trainer uses torch's fused AdamW on GPU (no temporaries)
    usable_fraction: float = 0.92  # the rest is left to the caching allocator's fragmentation
    # host seconds per operation the step launches (eager: an aten op dispatched; compiled: a kernel or extern
    # call): CALIBRATED on the one GPU measurement, see HOST_LAUNCH_S. 0: the host is the device (CPU)
    launch_s: float = 0.0


# Host time per launched operation, calibrated on the one GPU measurement (docs/performance.md §7): owt_124m,
# bf16, eager, TP 1, ZeRO 1, micro-batch 8 on one H200 ran 78,027 tokens/s = 0.105 s per step, with
# DeepSpeed's synchronizing throughput timer on (host and device in series). The device part the planner
# predicts for that step is ~0.022 s (matmuls 0.010, elementwise passes 0.012), which leaves ~0.083 s of host
# time for the 12,146 aten ops the eager census (census.eager_census) counts per forward + backward: 6.8 µs
# per op, rounded to 7 µs (DeepSpeed's own per-step Python is folded into it). The same cost is charged per
# compiled kernel launch (Inductor's wrapper launches kernels without the dispatcher, so this errs high).
HOST_LAUNCH_S = 7e-6
# Each call of a compiled region (a block's forward or backward, the head, the embedding) also runs guards
# and AOTAutograd's runtime wrappers on the host: ASSUMED, not measured (the next GPU run can, with --profile)
HOST_GRAPH_CALL_S = 50e-6

# Vendor data sheets for memory, peak and link rates; the achievable fractions are typical measured values
# (cuBLAS bf16 GEMMs ~70% of peak on H100/H200, ~75% on A100; NCCL bus bandwidth ~80% of link rate;
# streaming kernels ~85% of HBM). CPU is a nominal 2-socket host, only for planning CPU test runs.
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 80 * 2**30, 989e12, 0.70, 3.35e12, 0.85, 360e9, 40e9, 15e-6, 2.5 * GB, 2, True,
                     launch_s=HOST_LAUNCH_S),
    "h200": Hardware("h200", 141e9, 989e12, 0.70, 4.8e12, 0.85, 360e9, 40e9, 15e-6, 2.5 * GB, 2, True,
                     launch_s=HOST_LAUNCH_S),
    "a100": Hardware("a100", 80 * 2**30, 312e12, 0.75, 2.04e12, 0.85, 230e9, 20e9, 15e-6, 2.5 * GB, 2, True,
                     launch_s=HOST_LAUNCH_S),
    "cpu": Hardware("cpu", 64 * 2**30, 1e12, 0.50, 100e9, 0.50, 20e9, 10e9, 50e-6, 0.0, 4, False, 0.9),
}

# Elementwise passes over one [tokens, n_local] tensor per Pattention (l2_norm_gelu / gelu_l2_norm), counted
# in units of one read or write of that tensor in the compute dtype, from tokenformer_dist/model/lean.py:
#   forward   sum of squares: to(fp32) 1r+2w, square 2r+2w, row-sum 2r (fp32 = 2 units; 3 in fp32 compute);
#             mul by scale 1r+1w, GeLU in place 1r+1w                                   -> 13 bf16 / 7 fp32
#   backward  recompute Θ 4; a·scale 2, GeLU' in place 3, ·A 3, row-sum 1; mul_ 2, addcmul_ 3 -> 18
LEAN_PASSES_FWD = {2: 13, 4: 7}
LEAN_PASSES_BWD = 18
# Other elementwise work per layer in passes over a [tokens, d] tensor (two LayerNorms fwd 2 + bwd 4 each,
# two residual adds, rotary, the pair reshapes/copies and SDPA's softmax fwd+bwd, approximately)
D_PASSES_PER_LAYER = 40
# The loss head's passes over [tokens, V/tp] fp32: float copy, log-softmax, NLL grad, log-softmax backward
CE_PASSES = 8


# The compiled path (train.compile; model/compile.py, Inductor) in the same units, from the kernels of one
# compiled owt_124m block: per Pattention, forward: one kernel reads A for Σ A², scales, applies GeLU and writes
# Θ (A read twice, Θ written: 3 passes); backward: Θ recomputed for dV (A read, Θ written: 2), then dA with its
# row sum (dΘ and A read twice, dA written: 5) -> 3 / 7. With ~20 passes over [tokens, d] per layer left
# (LayerNorms, residuals and rotary fused into their neighbours) this gives 122 KB per token per layer at
# owt_124m; Inductor's own byte count of the generated kernels (bench/bench_step_kernels.py: 403 MB forward +
# 579 MB backward per block at 8192 tokens) is 120 KB.
COMPILED_PASSES_FWD = 3
COMPILED_PASSES_BWD = 7
COMPILED_D_PASSES_PER_LAYER = 20
# the compiled loss head in fp32 [tokens, V] passes: Inductor counts 850 MB forward + 1,712 MB backward at 8192
# tokens × 50,304 (bench/bench_step_kernels.py): 1.6 passes, against the eager head's 8
COMPILED_CE_PASSES = 1.6
# Launches of one compiled forward + backward at TP 1 (bench/bench_step_kernels.py, owt_124m, bf16,
# micro-batch 8 on the CPU: 735 = 12 × 60 per block — a forward graph of 21 kernels, a backward graph of 29,
# 10 detaches outside them — + 15 outside the blocks; independent of the token count)
COMPILED_LAUNCHES_PER_LAYER = 60
COMPILED_LAUNCHES_OUTSIDE = 15
COMPILED_GRAPH_CALLS_PER_LAYER = 2  # a block's forward graph and its backward graph
COMPILED_GRAPH_CALLS_OUTSIDE = 2  # the loss head's


@dataclass(frozen=True)
class ZeroSettings:
    """What DeepSpeed does with the gradients at one layout (`zero_settings` reads it off the config the trainer
    gives DeepSpeed). The defaults are DeepSpeed's own for a model whose gradients are in its dtype."""

    reduce_bucket: int = DEFAULT_REDUCE_BUCKET  # elements
    overlap_comm: bool = False  # DeepSpeed's default for ZeRO 1/2
    grad_bytes: int | None = None  # gradient (accumulation) dtype; None: the model dtype
    reduce_bytes: int | None = None  # dtype of the DP gradient reduction; None: the gradient dtype
    # ZeRO 1 accumulating in fp32 selects DeepSpeed's BF16_Optimizer: no gradient hooks, so no reduce bucket and
    # one all-reduce (not a reduce-scatter) of all fp32 gradients after the whole backward, never overlapped
    bf16_optimizer: bool = False


def zero_settings(cfg: Config, hw: Hardware, lay: Layout | None = None) -> ZeroSettings:
    """The DeepSpeed optimizer path of `cfg` (at layout `lay` when given) on `hw`, from the very dict
    deepspeed_config.deepspeed_config builds for the trainer, read with DeepSpeed 0.19.8's rules (engine.py
    `_do_optimizer_sanity_check`, zero/stage_1_and_2.py, zero/stage3.py): `grad_accum_dtype` fp32 is honoured
    at ZeRO 1 (BF16_Optimizer) and 3, ignored at ZeRO 2 (the partition stays in the parameter dtype);
    `communication_data_type` is the reduction dtype at every stage; overlap_comm only on a GPU."""
    from dataclasses import replace

    from tokenformer_dist.distributed.deepspeed_config import deepspeed_config

    if lay is not None:
        cfg = replace(cfg, parallel=replace(cfg.parallel, tp=lay.tp, zero_stage=lay.zero_stage),
                      train=replace(cfg.train, micro_batch_size=lay.micro_batch, grad_accum_steps=lay.grad_accum))
    dp = lay.dp if lay is not None else 1
    w = hw.dtype_bytes
    ds = deepspeed_config(cfg, dp, bf16=w == 2, universal=False, on_gpu=hw.name != "cpu")
    zero, stage = ds["zero_optimization"], ds["zero_optimization"]["stage"]
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    grad_bytes = 4 if accum == "fp32" and stage in (1, 3) else w
    comm = ds.get("communication_data_type")
    reduce_bytes = {"fp32": 4, "bf16": 2}.get(comm, grad_bytes)
    return ZeroSettings(int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)), bool(zero.get("overlap_comm")),
                        grad_bytes, reduce_bytes, stage == 1 and grad_bytes != w)


@dataclass(frozen=True)
class Layout:
    tp: int
    dp: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    compile: bool = False  # train.compile: the compiled step (fused kernels, fewer launches)


@dataclass
class Estimate:
    layout: Layout
    weights: float
    grads: float
    optimizer: float
    bucket: float
    activations: float  # kept for backward at the end of forward (all micro-batch activations + loss head)
    workspace: float
    peak: float  # bytes: max over phases, + workspace
    phase_peaks: dict[str, float]
    compute_s: float
    tp_comm_s: float
    dp_comm_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    fits: bool
    reason: str = ""  # why it does not fit / is not valid
    matmul_s: float = float("nan")  # the two parts of compute_s
    elementwise_s: float = float("nan")
    host_s: float = float("nan")  # host time of the step's launches (overlaps the device's work, see estimate)

    def summary(self) -> dict[str, object]:
        lay = self.layout
        return {"tp": lay.tp, "dp": lay.dp, "zero_stage": lay.zero_stage, "micro_batch": lay.micro_batch,
                "grad_accum": lay.grad_accum, "activation_checkpointing": lay.activation_checkpointing,
                "compile": lay.compile, "mem_gb_per_gpu": round(self.peak / GB, 2), "step_s": round(self.step_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 1), "mfu": round(self.mfu, 4)}


# ---- parameter counts ------------------------------------------------------------------------------------
def params_per_rank(m: ModelConfig, tp: int) -> int:
    """Parameters one TP rank holds: every Pattention's n/tp token rows, V/tp embedding rows, the final LN."""
    d = m.d_model
    return m.vocab_size // tp * d + m.n_layers * (pattention_params_per_layer(m) // tp) + 2 * d


def largest_layer_params(m: ModelConfig, tp: int) -> int:
    return max(pattention_params_per_layer(m) // tp, m.vocab_size // tp * m.d_model)


# ---- activations -----------------------------------------------------------------------------------------
def activation_elements_per_token(m: ModelConfig, tp: int) -> tuple[float, float]:
    """(compute-dtype elements, fp32 elements) autograd keeps per token per block, without checkpointing.

    From the block's forward (model/tokenformer.py, attention.py), checked with saved_tensors_hooks:
      d-sized, replicated over TP: block input (LN1), LN1 output (shared by the Q, K, V Pattentions),
        residual after attention (LN2), LN2 output (FFN input)                                   4d
      attention at TP 1: V's pair copy, rotary Q and K, SDPA output, the proj input (pairs reshaped) 5d
      attention at TP > 1: proj input (all-gathered pairs, reshaped: a copy) d; the reduce-scattered
        [pairs, 3, s, hd] Q/K/V storage 3d/tp (V is a view into it); rotary Q, K and SDPA output 3d/tp
      lean Pattention: one [tokens, n/tp] tensor each (A)                       (3·n_qkv + n_proj + n_ffn)/tp
      fp32: 5 Pattention normalizers, 2 LayerNorms' mean and rstd, SDPA's log-sum-exp per local pair
    """
    d = m.d_model
    attention = 5 * d if tp == 1 else d + 6 * d / tp
    n_sum = parameter_tokens_per_layer(m) / tp
    return 4 * d + attention + n_sum, 5 + 4 + m.n_heads / tp


def _head_bytes(m: ModelConfig, tp: int, tokens: int, w: int) -> tuple[float, float, float]:
    """Loss head, per micro-batch: (kept for backward, extra transient at the end of forward, extra transient
    at the start of backward). model/tokenformer.py: final LN keeps its input and output (d each); logits
    [T, V/tp] in the model dtype; TP 1: F.cross_entropy on logits.float() keeps log-softmax (fp32), its
    backward makes the NLL gradient and the log-softmax gradient (fp32, each [T, V]); TP > 1: megatron's
    vocab-parallel cross entropy keeps softmax in an fp32 copy and computes its gradient in place."""
    v = m.vocab_size / tp
    kept = tokens * (2 * m.d_model * w + v * 4)
    logits = tokens * v * w
    if tp == 1:  # logits + (bf16: their fp32 copy) while log-softmax is computed
        fwd_extra = logits + (tokens * v * 4 if w != 4 else 0.0)
        bwd_extra = 2 * tokens * v * 4 + (tokens * v * w if w != 4 else 0.0)
    else:  # logits while the (kept) fp32 copy is made; the gradient is computed in place in the copy
        fwd_extra = logits
        bwd_extra = tokens * v * w if w != 4 else 0.0  # cast back to the logits' dtype
    return kept, fwd_extra, bwd_extra


# ---- communication (the TP formula is the one bench/bench_tp_comm.py checks against counted collectives) ---
def tp_layer_comm_bytes(d: int, tp: int, tokens: int, norm: str = "l2_norm_gelu",
                        elem_bytes: int = 4) -> dict[str, float]:
    """Bytes one rank sends per TokenFormer layer (ring algorithms), docs/tensor_parallel.md §3.

    forward = RS(3d) + AG(d) + AR(d) + AR(d) + 5 AR(1 fp32) [+ 5 AR(1) MAX for softmax];
    backward = AG(3d) + RS(d) + AR(d) + AR(d) + 5 AR(1 fp32). AR counts 2(tp−1)/tp, RS/AG (tp−1)/tp.
    `megatron_dense` is Megatron's dense layer (2 AR(d) each way) for comparison. Activations travel in
    `elem_bytes` (the compute dtype); the [tokens, 1] normalizers are always fp32."""
    f = (tp - 1) / tp * tokens
    scalar_ars = 5 * 2 * (2 if norm == "softmax" else 1)
    return {
        "fwd": f * ((3 * d + d + 2 * d + 2 * d) * elem_bytes + scalar_ars * 4),
        "bwd": f * ((3 * d + d + 2 * d + 2 * d) * elem_bytes + 10 * 4),
        "megatron_dense": f * 4 * 2 * d * elem_bytes,
    }


TP_COLLECTIVES_PER_LAYER = 18  # 9 per direction (RS, AG, 2 AR, 5 normalizer ARs)
OVERLAP_COST = 0.1  # fraction of an overlapped transfer's duration charged to the step (SMs, HBM taken)
ZERO3_FETCH_S = 150e-6  # DeepSpeed ZeRO-3 hook work per module fetch/release (assumed, not measured here)


def tp_comm_seconds(m: ModelConfig, tp: int, tokens: int, hw: Hardware, checkpointing: bool) -> float:
    """TP collectives of one micro-batch: layers (+ the forward again with checkpointing) and the model ends
    (vocab-parallel embedding all-reduce fwd, output-layer copy_to all-reduce bwd, 3 [T] cross-entropy ARs)."""
    if tp == 1:
        return 0.0
    b = hw.dtype_bytes
    layer = tp_layer_comm_bytes(m.d_model, tp, tokens, m.norm, b)
    per_layer = layer["fwd"] * (2 if checkpointing else 1) + layer["bwd"]
    ends = (tp - 1) / tp * tokens * (4 * m.d_model * b + 6 * 4)
    calls = m.n_layers * (TP_COLLECTIVES_PER_LAYER + (9 if checkpointing else 0)) + 5
    return (m.n_layers * per_layer + ends) / hw.nvlink_bandwidth + calls * hw.latency


def dp_comm_seconds(m: ModelConfig, lay: Layout, hw: Hardware, nodes: int, micro_s: float,
                    zs: ZeroSettings = ZeroSettings()) -> float:
    """Exposed data-parallel time per optimizer step. Weights travel in the model dtype, gradients in the
    reduction dtype (zs.reduce_bytes); a ring over dp ranks sends (dp−1)/dp of the buffer per GPU, over
    InfiniBand when the DP group spans nodes.

    ZeRO 0: all-reduce of the gradients after the last backward (DeepSpeed's engine: not overlapped).
    ZeRO 1, BF16_Optimizer (fp32 accumulation): all-reduce of the fp32 gradients after the last backward, not
      overlapped (it has no gradient hooks), + all-gather of the updated weights after the step.
    ZeRO 1, ZeRO optimizer: reduce-scatter at the last micro-batch's backward + all-gather of the updated
      weights after the step; both exposed unless overlap_comm, which hides the reduce-scatter behind that
      backward (the bucketed gradient hooks fire as the backward proceeds).
    ZeRO 2: as ZeRO 1, but gradients are reduced at EVERY micro-batch (partitioned gradients).
    ZeRO 3: gradients reduce-scattered at every micro-batch, weights all-gathered in every forward and every
      backward, module by module (each fetch pays a collective latency and ZERO3_FETCH_S of DeepSpeed's
      Python hooks on the critical path); DeepSpeed prefetches, so the transfer is exposed only where it
      exceeds 80% of the forward / backward compute.
    Overlapped transfers are not free: NCCL kernels take SMs and HBM bandwidth from compute; we charge
    OVERLAP_COST of their duration.
    """
    if lay.dp == 1:
        return 0.0
    p_rank = params_per_rank(m, lay.tp)
    bw = hw.ib_bandwidth if nodes > 1 else hw.nvlink_bandwidth
    lat = math.log2(lay.dp) * hw.latency
    ring = (lay.dp - 1) / lay.dp * p_rank * hw.dtype_bytes / bw + lat  # weights (model dtype)
    reduce_bytes = zs.reduce_bytes or zs.grad_bytes or hw.dtype_bytes
    g_ring = (lay.dp - 1) / lay.dp * p_rank * reduce_bytes / bw + lat  # gradients
    fwd_s, bwd_s = micro_s / 3, micro_s * 2 / 3
    if lay.zero_stage == 0:
        return 2 * g_ring
    if lay.zero_stage == 1 and zs.bf16_optimizer:
        return 2 * g_ring + ring
    if lay.zero_stage in (1, 2):
        reduces = 1 if lay.zero_stage == 1 else lay.grad_accum
        rs = g_ring * reduces
        hidden = min(bwd_s * reduces, rs) if zs.overlap_comm else 0.0
        return rs - hidden * (1 - OVERLAP_COST) + ring
    modules = 5 * m.n_layers + 2  # the Pattentions, the embedding, the final LayerNorm
    gather = ring - lat + modules * lat
    exposed = max(0.0, gather - 0.8 * fwd_s) + max(0.0, gather + g_ring - 0.8 * bwd_s)
    hidden = 2 * gather + g_ring - exposed
    return (exposed + OVERLAP_COST * hidden + 2 * modules * ZERO3_FETCH_S) * lay.grad_accum


# ---- compute ---------------------------------------------------------------------------------------------
def compute_seconds(m: ModelConfig, lay: Layout, hw: Hardware,
                    lean_passes: tuple[int, int] | None = None) -> tuple[float, float]:
    """Device compute time of one micro-batch: matmul FLOPs at hw.matmul_efficiency plus elementwise bytes at
    hw.hbm_efficiency; each rank does 1/tp of the matmuls and of the [T, n] elementwise work (the [T, d] work
    is replicated over TP). The elementwise passes are the eager lean Pattention's or, with `lay.compile`, the
    compiled step's (COMPILED_*); `lean_passes` (forward, backward) replaces the Pattention's pass counts.
    Returns (matmul seconds, elementwise seconds)."""
    tokens = lay.micro_batch * m.seq_len
    b = hw.dtype_bytes
    fwd_flops = forward_flops_per_token(m) * tokens / lay.tp
    flops = flops_per_token(m) * tokens / lay.tp + (fwd_flops if lay.activation_checkpointing else 0.0)
    n_sum = parameter_tokens_per_layer(m) / lay.tp
    if lay.compile:
        fwd_passes, bwd_passes = lean_passes or (COMPILED_PASSES_FWD, COMPILED_PASSES_BWD)
        d_passes, ce_passes = COMPILED_D_PASSES_PER_LAYER, COMPILED_CE_PASSES
    else:
        fwd_passes, bwd_passes = lean_passes or (LEAN_PASSES_FWD[b], LEAN_PASSES_BWD)
        d_passes, ce_passes = D_PASSES_PER_LAYER, CE_PASSES
    passes = fwd_passes * (2 if lay.activation_checkpointing else 1) + bwd_passes
    elem = tokens * m.n_layers * (passes * n_sum * b + d_passes * m.d_model * b)
    elem += tokens * ce_passes * m.vocab_size / lay.tp * 4
    t_mm = flops / (hw.peak_flops * hw.matmul_efficiency)
    t_elem = elem / (hw.hbm_bandwidth * hw.hbm_efficiency)
    return t_mm, t_elem


def launches_per_micro_batch(m: ModelConfig, lay: Layout) -> tuple[float, int]:
    """(operations the host launches for one micro-batch's forward + backward, compiled-graph calls among
    them). Eager: the aten ops census.eager_census counts for this model at this micro-batch (TP 1; at TP > 1
    plus the collectives); compiled: COMPILED_LAUNCHES_* (at TP > 1 every TP collective is a graph break: one
    more launch and one more graph call each). Activation checkpointing runs the blocks' forward twice, about
    a third of a block's launches."""
    recompute = 4 / 3 if lay.activation_checkpointing else 1.0
    collectives = TP_COLLECTIVES_PER_LAYER * m.n_layers if lay.tp > 1 else 0
    if lay.compile:
        launches = COMPILED_LAUNCHES_OUTSIDE + m.n_layers * COMPILED_LAUNCHES_PER_LAYER * recompute + collectives
        calls = COMPILED_GRAPH_CALLS_OUTSIDE + m.n_layers * COMPILED_GRAPH_CALLS_PER_LAYER + collectives
        return launches, calls
    per_layer, outside = _eager_ops(m, lay.micro_batch)
    return outside + m.n_layers * per_layer * recompute + collectives, 0


_EAGER_OPS: dict[tuple, tuple[int, int]] = {}


def _eager_ops(m: ModelConfig, micro_batch: int) -> tuple[int, int]:
    """census.eager_ops_per_layer, memoized (a meta-device census costs about a second)."""
    from dataclasses import astuple

    from tokenformer_dist.planning.census import eager_ops_per_layer

    key = (astuple(m), micro_batch)
    if key not in _EAGER_OPS:
        _EAGER_OPS[key] = eager_ops_per_layer(m, micro_batch)
    return _EAGER_OPS[key]


# ---- memory ----------------------------------------------------------------------------------------------
def memory(m: ModelConfig, lay: Layout, hw: Hardware, zs: ZeroSettings = ZeroSettings()) -> dict[str, float]:
    """Per-GPU memory terms and phase peaks in bytes (see the module docstring)."""
    w, dp, z, tp = hw.dtype_bytes, lay.dp, lay.zero_stage, lay.tp
    g = zs.grad_bytes or w  # gradient (accumulation) dtype
    p = params_per_rank(m, tp)
    tokens = lay.micro_batch * m.seq_len
    weights = p * w if z < 3 else p * w / dp + 2 * largest_layer_params(m, tp) * w
    grads = p * g if z < 2 else p * g / dp
    master = 0.0 if (z == 0 and w == 4) else p * 4
    optimizer = (master + 8 * p) / (dp if z >= 1 else 1)
    # ZeRO 1-3's gradient buckets in the gradient dtype (two with overlap_comm), plus the copy a reduction in
    # another dtype casts each bucket to; BF16_Optimizer (no hooks) and ZeRO 0 have none
    reduce_bytes = zs.reduce_bytes or g
    bucket = 0.0 if z == 0 or zs.bf16_optimizer else zs.reduce_bucket * (
        g * (2 if zs.overlap_comm else 1) + (reduce_bytes if reduce_bytes != g else 0))
    static = weights + optimizer

    cdt, f32 = activation_elements_per_token(m, tp)
    block = tokens * (cdt * w + f32 * 4)
    head_kept, head_fwd, head_bwd = _head_bytes(m, tp, tokens, w)
    if lay.activation_checkpointing:
        blocks = tokens * m.n_layers * m.d_model * w  # each block's input only
        recompute = block  # one block's activations, alive while its backward runs
    else:
        blocks, recompute = m.n_layers * block, 0.0
    kept = blocks + head_kept
    # a block's backward: the lean FFN's work buffer [T, n_ffn/tp] and a few [T, d] gradients
    block_bwd = tokens * (m.ffn_tokens / tp + 3 * m.d_model) * w
    embed_grad = m.vocab_size / tp * m.d_model * w  # tied embedding: its gradient from the output layer
    grads_during = grads if lay.grad_accum > 1 else 0.0  # earlier micro-batches' gradients
    # DeepSpeed allocates the bucket at the first gradient hook (the final LayerNorm's, right after the loss
    # head's backward) and frees it after the step's reduction; with grad-accum it lives across micro-batches
    bucket_fwd = bucket if lay.grad_accum > 1 else 0.0
    grads_live = p * g if z < 2 else grads + largest_layer_params(m, tp) * g
    fwd = static + grads_during + bucket_fwd + kept + head_fwd
    head = static + grads_during + bucket_fwd + kept + head_bwd
    blocks_bwd = (static + grads_during + bucket + blocks + recompute + tokens * 2 * m.d_model * w + embed_grad
                  + block_bwd)
    # end: all gradients, and the embedding's dense gradient being summed with the output layer's
    bwd_end = static + bucket + grads_live + 2 * embed_grad
    if z == 0:
        bwd_end += min(p, zs.reduce_bucket) * g  # the engine's flattened all-reduce buffer
    # optimizer step: ZeRO 1/2 copy this rank's gradient partition out of the bucket and flatten it to fp32;
    # torch's single-tensor AdamW (CPU) makes two [P/dp] fp32 temporaries (sqrt, divide); fused AdamW none
    part = p / (dp if z >= 1 else 1)
    flat = part * (g + 4) if g != 4 else part * 4
    adam_tmp = 0.0 if hw.fused_adam else 2 * part * 4
    opt = static + (grads if z < 1 else part * g) + flat + adam_tmp
    phases = {"forward": fwd, "backward": max(head, blocks_bwd, bwd_end), "optimizer": opt}
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "bucket": bucket, "activations": kept,
            "workspace": hw.workspace, "phase_peaks": phases, "peak": max(phases.values()) + hw.workspace}


# ---- layouts ---------------------------------------------------------------------------------------------
class PlanError(ValueError):
    """Bad planner input; one line naming the flag or config field and what is valid."""


def global_batch(cfg: Config, world: int) -> int:
    """Sequences per optimizer step the config trains at this world size (what the trainer would run:
    micro_batch_size x grad_accum_steps x world/tp). Where the config's tp does not divide the world (e.g. one
    GPU), its DP size is taken as max(1, world // tp)."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * max(1, world // cfg.parallel.tp)


def layout_problem(m: ModelConfig, tp: int, micro_batch: int) -> str:
    """Why (tp, micro_batch) cannot run this model, or '' (plan() has already kept tp inside a node)."""
    for key in ("qkv_tokens", "proj_tokens", "ffn_tokens", "vocab_size"):
        if getattr(m, key) % tp:
            return f"model.{key}={getattr(m, key)} is not divisible by tp {tp}"
    if (micro_batch * m.n_heads) % tp:
        return f"micro-batch {micro_batch} x {m.n_heads} heads is not divisible by tp {tp} (attention pairs)"
    return ""


def estimate(cfg: Config, lay: Layout, hw: Hardware, nodes: int, zs: ZeroSettings | None = None,
             lean_passes: tuple[int, int] | None = None, host_serial: bool = False) -> Estimate:
    """One layout. Per micro-batch the device computes (matmuls, elementwise passes, TP collectives in the
    compute stream) while the host launches the next operations; the slower of the two sets the pace. With
    `host_serial` a synchronization every step keeps them from overlapping (host + device): what the GPU
    measurement calibrating HOST_LAUNCH_S ran, with DeepSpeed's synchronizing throughput timer on."""
    m = cfg.model
    zs = zs or zero_settings(cfg, hw, lay)
    mem = memory(m, lay, hw, zs)
    mm_s, elem_s = compute_seconds(m, lay, hw, lean_passes)
    compute_s = mm_s + elem_s
    tokens = lay.micro_batch * m.seq_len
    tp_micro = tp_comm_seconds(m, lay.tp, tokens, hw, lay.activation_checkpointing)
    launches, graph_calls = launches_per_micro_batch(m, lay) if hw.launch_s else (0, 0)
    host = launches * hw.launch_s + graph_calls * HOST_GRAPH_CALL_S
    device = compute_s + tp_micro
    micro = host + device if host_serial else max(host, device)
    dp_s = dp_comm_seconds(m, lay, hw, nodes, compute_s, zs)
    step = micro * lay.grad_accum + dp_s
    world = lay.tp * lay.dp
    tok_s = tokens * lay.grad_accum * lay.dp / step
    mfu = tok_s * flops_per_token(m) / (hw.peak_flops * world)
    limit = hw.memory * hw.usable_fraction
    fits = mem["peak"] <= limit
    reason = "" if fits else (f"needs {mem['peak'] / GB:.1f} GB > {limit / GB:.1f} GB usable of "
                              f"{hw.memory / GB:.1f} GB ({_largest_term(mem)})")
    ga = lay.grad_accum
    return Estimate(lay, mem["weights"], mem["grads"], mem["optimizer"], mem["bucket"], mem["activations"],
                    mem["workspace"], mem["peak"], mem["phase_peaks"], compute_s * ga, tp_micro * ga, dp_s, step,
                    tok_s, mfu, fits, reason, mm_s * ga, elem_s * ga, host * ga)


def _largest_term(mem: dict[str, float]) -> str:
    terms = {k: mem[k] for k in ("weights", "grads", "optimizer", "bucket", "activations")}
    k = max(terms, key=terms.__getitem__)
    return f"largest term: {k} {terms[k] / GB:.1f} GB"


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu: str, tp: int | None = None,
         micro_batch: int | None = None, zero_stage: int | None = None, checkpointing: bool | None = None,
         zs: ZeroSettings | None = None, lean_passes: tuple[int, int] | None = None, compile: bool | None = None,
         host_serial: bool = False) -> list[Estimate]:
    """Every layout (fixed arguments respected) with its estimate, fastest first; layouts that cannot run or
    fit carry a one-line `reason` and `fits=False`. `zs`: DeepSpeed settings (default: what the trainer gives
    DeepSpeed at each layout). `compile`: the compiled step or the eager one (default: what `train.compile`
    does on this kind of device)."""
    from tokenformer_dist.config import compile_on

    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes {nodes} / --gpus-per-node {gpus_per_node}: both must be >= 1")
    if gpu not in HARDWARE:
        raise PlanError(f"--gpu {gpu!r}: unknown; valid: {', '.join(HARDWARE)}")
    if tp is not None and tp > gpus_per_node:
        raise PlanError(f"--tp {tp} > --gpus-per-node {gpus_per_node}: TP must stay inside a node")
    if tp is not None and (tp < 1 or gpus_per_node % tp):
        raise PlanError(f"--tp {tp} must divide --gpus-per-node {gpus_per_node}")
    if zero_stage is not None and zero_stage not in ZERO_STAGES:
        raise PlanError(f"--zero-stage {zero_stage}: valid: 0, 1, 2, 3")
    if micro_batch is not None and micro_batch < 1:
        raise PlanError(f"--micro-batch {micro_batch}: must be >= 1")
    hw = HARDWARE[gpu]
    if compile is None:
        compile = compile_on(cfg, "cpu" if hw.name == "cpu" else "cuda")
    world = nodes * gpus_per_node
    seqs = global_batch(cfg, world)
    tps = [tp] if tp is not None else [t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0]
    mbs = [micro_batch] if micro_batch is not None else list(MICRO_BATCHES)
    stages = [zero_stage] if zero_stage is not None else list(ZERO_STAGES)
    cks = [checkpointing] if checkpointing is not None else [False, True]
    out: list[Estimate] = []
    for t, b, z, ck in itertools.product(tps, mbs, stages, cks):
        dp = world // t
        ga, rem = divmod(seqs, b * dp)
        lay = Layout(t, dp, z, b, max(ga, 1), ck, compile)
        problem = layout_problem(cfg.model, t, b)
        if not problem and (rem or ga < 1):
            problem = f"global batch {seqs} sequences is not a multiple of micro-batch {b} x dp {dp}"
        if problem:
            if tp is not None or micro_batch is not None or not problem.startswith("global batch"):
                out.append(_invalid(lay, problem))
            continue
        out.append(estimate(cfg, lay, hw, nodes, zs, lean_passes, host_serial))
    # fastest first; ties go to the larger micro-batch (fewer, larger kernels), then to the smaller memory
    out.sort(key=lambda e: (not e.fits, round(e.step_s, 6) if e.fits else e.peak, -e.layout.micro_batch,
                            e.peak if e.fits else 0.0))
    return out


def _invalid(lay: Layout, reason: str) -> Estimate:
    nan = float("nan")
    return Estimate(lay, nan, nan, nan, nan, nan, nan, nan, {}, nan, nan, nan, nan, nan, nan, False, reason)


def best(estimates: list[Estimate]) -> Estimate | None:
    fitting = [e for e in estimates if e.fits]
    return fitting[0] if fitting else None  # plan() sorts fastest first


# ---- command line (tools/plan.py) ------------------------------------------------------------------------
JSON_KEYS = ("tp", "dp", "zero_stage", "micro_batch", "grad_accum", "activation_checkpointing", "compile",
             "mem_gb_per_gpu", "step_s", "tokens_per_s", "mfu")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints the usage too)
        raise PlanError(message)


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tokenformer_dist.cli import positive_int

    p = _Parser(prog="tools/plan.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--nodes", type=positive_int, required=True)
    p.add_argument("--gpus-per-node", type=positive_int, required=True)
    p.add_argument("--gpu", required=True, choices=tuple(HARDWARE))
    p.add_argument("--tp", type=positive_int, default=None, help="fix the tensor-parallel degree")
    p.add_argument("--micro-batch", type=positive_int, default=None, help="fix the micro-batch size")
    p.add_argument("--zero-stage", type=int, default=None, choices=ZERO_STAGES, help="fix the ZeRO stage")
    p.add_argument("--activation-checkpointing", type=_on_off, default=None, metavar="on|off")
    p.add_argument("--compile", type=_on_off, default=None, metavar="on|off",
                   help="predict the compiled or the eager step (default: what train.compile does on this device)")
    return p.parse_args(argv)


def format_row(e: Estimate) -> str:
    lay = e.layout
    head = (f"{lay.tp:>3} {lay.dp:>4} {lay.zero_stage:>4} {lay.micro_batch:>5} {lay.grad_accum:>4} "
            f"{'on' if lay.activation_checkpointing else 'off':>4}")
    if math.isnan(e.peak):
        return f"{head}  cannot run: {e.reason}"
    ph = e.phase_peaks
    return (f"{head} {e.weights / GB:>7.2f} {e.grads / GB:>6.2f} {e.optimizer / GB:>6.2f} {e.bucket / GB:>6.2f} "
            f"{e.activations / GB:>7.2f} {e.workspace / GB:>5.2f} "
            f"{max(ph.values()) / GB:>6.2f}/{'fbo'[list(ph).index(max(ph, key=ph.__getitem__))]} "
            f"{e.peak / GB:>7.2f} {e.compute_s:>8.4f} {e.host_s:>7.4f} {e.tp_comm_s:>7.4f} {e.dp_comm_s:>7.4f} "
            f"{e.step_s:>8.4f} "
            f"{e.tokens_per_s:>11,.0f} {e.mfu:>6.1%}" + ("" if e.fits else f"  does not fit: {e.reason}"))


HEADER = (" tp   dp zero micro   ga ckpt weights  grads  optim bucket   activ  work phase/at    peak "
          "compute_s  host_s  tp_s    dp_s    step_s    tokens/s    mfu")


def main(argv: list[str] | None = None) -> int:
    from tokenformer_dist.config import ConfigError, load_config

    try:
        args = parse_args(argv)
        cfg = load_config(args.config)
        estimates = plan(cfg, args.nodes, args.gpus_per_node, args.gpu, args.tp, args.micro_batch,
                         args.zero_stage, args.activation_checkpointing, compile=args.compile)
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hw = HARDWARE[args.gpu]
    m = cfg.model
    world = args.nodes * args.gpus_per_node
    seqs = global_batch(cfg, world)
    print(f"{cfg.source}: {param_count_str(m)} on {args.nodes} node(s) x {args.gpus_per_node} {hw.name}; global "
          f"batch {seqs} x {m.seq_len} = {seqs * m.seq_len:,} tokens/step; {flops_per_token(m) / 1e9:.2f} GFLOP/token")
    print(f"compute at {hw.matmul_efficiency:.0%} of {hw.peak_flops / 1e12:.0f} TFLOP/s for matmuls and "
          f"{hw.hbm_efficiency:.0%} of {hw.hbm_bandwidth / 1e12:.2f} TB/s for elementwise passes; NVLink "
          f"{hw.nvlink_bandwidth / 1e9:.0f} GB/s, IB {hw.ib_bandwidth / 1e9:.0f} GB/s per GPU; memory in GB (1e9), "
          f"usable {hw.usable_fraction:.0%} of {hw.memory / GB:.1f}; phase at peak: f(orward)/b(ackward)/o(ptimizer)")
    step = "compiled" if estimates and estimates[0].layout.compile else "eager"
    print(f"the {step} step (--compile {'on' if step == 'compiled' else 'off'}); host launches at "
          f"{hw.launch_s * 1e6:.0f} µs each, overlapping the device's work (host_s: per step)")
    print(HEADER)
    pick = best(estimates)
    for e in estimates:
        print(format_row(e) + ("   <== fastest that fits" if e is pick else ""))
    if pick is None:
        print("no layout fits; see the reasons above", file=sys.stderr)
        print(json.dumps({k: None for k in JSON_KEYS}))
        return 1
    print(json.dumps(pick.summary()))
    return 0


def param_count_str(m: ModelConfig) -> str:
    from tokenformer_dist.config import param_count

    return f"{param_count(m) / 1e6:,.1f}M parameters"
