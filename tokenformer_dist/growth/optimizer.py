"""Keeping optimizer state through growth (`keep_optimizer`): Adam moments and the step count carried
through an expansion, as a universal checkpoint.

The source checkpoint is converted with DeepSpeed's ds_to_universal (full, TP-merged fp32 weights and Adam
moments per parameter), each tensor is grown — fp32 weights exactly as the weights are grown (same seed, so
both agree), moments with zero rows — and written back in the universal layout. The output directory then
also is a run directory whose latest checkpoint the trainer resumes (at any DP size, via DeepSpeed's
universal loading) at the source's step, data position and learning-rate schedule. Sources written with
ZeRO 1 or 2; the resumed run may use ZeRO 1 or 2 (DeepSpeed 0.19.8's ZeRO-3 universal loader neither reads
another stage's optimizer state nor slices tensor-parallel shards).

    DST/checkpoints/latest, DST/checkpoints/step_N/{meta.json, config.yaml, model_tpXX.safetensors,
                                                    universal/{zero/<param>/*.pt, *model_states.pt}}
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from tokenformer_dist.checkpoint.engine import LATEST, META, UNIVERSAL, convert_to_universal, read_meta, tag_for
from tokenformer_dist.checkpoint.weights import CONFIG, rank_file
from tokenformer_dist.config import Config, ConfigError, config_yaml
from tokenformer_dist.growth.tokens import Growth

MOMENTS = ("exp_avg", "exp_avg_sq")


def _grown(growth: Growth, name: str, tensor: torch.Tensor, zeros: bool) -> torch.Tensor:
    if zeros:  # Adam moments of the new rows start at zero
        n_new = growth.shape(name, tuple(tensor.shape))[0] if tensor.ndim else 0
        if tensor.ndim and n_new != tensor.shape[0]:
            return torch.cat([tensor, tensor.new_zeros((n_new - tensor.shape[0], *tensor.shape[1:]))])
        return tensor
    return torch.cat([b.float() for b in growth.grow(name, [tensor])]) if tensor.ndim else \
        growth.grow(name, [tensor])[0]


def check_source(src_dir: Path) -> dict:
    """The source checkpoint's meta, or a one-line error when its optimizer state cannot be carried."""
    if not (src_dir / META).is_file():
        raise ConfigError(f"keeping optimizer state: {src_dir} is not a trainer checkpoint (no {META}); optimizer "
                          f"state exists only in checkpoints written by tokenformer_dist.train")
    meta = read_meta(src_dir)
    if int(meta.get("zero_stage", 0)) == 3:
        raise ConfigError(f"keeping optimizer state: {src_dir} was written with ZeRO-3, whose optimizer state "
                          f"DeepSpeed 0.19.8's universal checkpoint cannot carry into another layout; expand the "
                          f"weights only (any ZeRO stage), or keep optimizer state from ZeRO 1/2 checkpoints")
    return meta


def expand_optimizer_state(src_dir: Path, out: Path, growth: Growth, target: Config, tp: int) -> None:
    """Add a resumable universal checkpoint with grown optimizer state to the (temporary) output `out`."""
    meta = check_source(src_dir)
    tag = tag_for(int(meta["step"]))
    ckpt = out / "checkpoints" / tag
    ckpt.mkdir(parents=True)
    src_universal = src_dir / UNIVERSAL
    scratch = None
    if not src_universal.is_dir():  # convert into the output's temp space; the source is left untouched
        scratch = convert_to_universal(src_dir, out / ".source_universal")
        src_universal = scratch
    dst_universal = ckpt / UNIVERSAL
    (dst_universal / "zero").mkdir(parents=True)
    for param_dir in sorted((src_universal / "zero").iterdir()):
        if not param_dir.is_dir():  # optimizer_state.pt: param groups and DeepSpeed objects, copied unread
            shutil.copy2(param_dir, dst_universal / "zero" / param_dir.name)
            continue
        name = param_dir.name
        (dst_universal / "zero" / name).mkdir()
        for f in sorted(param_dir.iterdir()):
            state = torch.load(f, weights_only=True)
            if isinstance(state, dict) and "param" in state:
                state["param"] = _grown(growth, name, state["param"].float(), zeros=f.stem in MOMENTS)
            torch.save(state, dst_universal / "zero" / name / f.name)
    # DeepSpeed reads step counters and client state from here; weights come from zero/ in universal mode.
    # The file name DeepSpeed looks for depends on the RESUMING run's ZeRO stage (zero_pp_rank_0_ prefix under
    # ZeRO-3), so write both: the resumed run may use any stage.
    states = torch.load(sorted(src_universal.glob("*model_states.pt"))[0], weights_only=True)
    states["module"] = {}
    states["mp_world_size"] = 1  # DeepSpeed checks it against the number of model-state files: one
    for fname in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save(states, dst_universal / fname)
    if scratch is not None:
        shutil.rmtree(scratch)
    for r in range(tp):
        os.link(rank_file(out, r), rank_file(ckpt, r))  # the grown weights (and τ), shared with the weights dir
    (ckpt / CONFIG).write_text(config_yaml(target))
    # dp 0 matches no run's DP size, so the trainer always loads this checkpoint through universal loading.
    meta = {**meta, "tp": tp, "dp": 0, "expanded_from": str(src_dir.resolve())}
    (ckpt / META).write_text(json.dumps(meta, indent=1))
    (out / "checkpoints" / LATEST).write_text(tag + "\n")
