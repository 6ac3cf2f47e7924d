"""Evaluation and generation at the launch's tensor-parallel degree, from a checkpoint of ANY TP degree and ZeRO
stage (both read the per-TP-rank fp32 master weights every checkpoint and weights dir holds).

    python -m tokenformer_dist.evaluate|generate ...                        one process at TP 1, no process group
    torchrun --nproc_per_node N -m tokenformer_dist.evaluate|generate ...   TP = --tp, DP = N / TP

Under a launcher the default TP is the largest degree that divides both N and the checkpoint's TP (so a
checkpoint is read as written whenever N allows it). At any other degree the checkpoint is resharded as it is
loaded: full tensors, one at a time, cut by the sharding table (checkpoint.engine.load_weights_resharded).
Plain `python` imports no megatron-core and starts no process group: the model is plain torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenformer_dist.config import Config


def launch_world_size() -> int:
    """Processes in this launch, read from the environment as launch.env_from_launcher reads it (torchrun and
    the deepspeed launcher set WORLD_SIZE, srun SLURM_NTASKS); 1 for a plain process."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env:
        return int(env.get("SLURM_NTASKS", "1"))
    return 1


def choose_tp(requested: int | None, checkpoint_tp: int, cfg: Config, world_size: int) -> int:
    """The TP degree to run at: `requested` (--tp) when it is valid, else the largest divisor of both the world
    size and the checkpoint's TP. One-line ValueError for a degree the launch or the model cannot take."""
    if requested is None:
        return math.gcd(world_size, checkpoint_tp)
    if requested <= 0:
        raise ValueError(f"--tp {requested}: must be a positive integer")
    if world_size % requested:
        how = ("plain `python` runs one process, at --tp 1; for TP N launch N processes with torchrun "
               "--nproc_per_node N" if world_size == 1 else f"valid: a divisor of {world_size}")
        raise ValueError(f"--tp {requested} does not divide the {world_size} process(es) of this launch; {how}")
    m = cfg.model
    counts = {"qkv_tokens": m.qkv_tokens, "proj_tokens": m.proj_tokens, "ffn_tokens": m.ffn_tokens,
              "vocab_size": m.vocab_size}
    for key, n in counts.items():
        if n % requested:
            common = math.gcd(*counts.values())
            valid = ", ".join(str(d) for d in range(1, min(common, world_size) + 1) if common % d == 0
                              and world_size % d == 0)
            raise ValueError(f"--tp {requested}: the checkpoint's model.{key}={n} does not split over {requested} "
                             f"tensor-parallel ranks; valid --tp for this model and launch: {valid}")
    return requested


@dataclass(frozen=True)
class Launch:
    device: torch.device
    tp_group: Any  # torch.distributed.ProcessGroup; None for one plain process
    info: Any  # launch.DistInfo; None for one plain process

    @property
    def is_main(self) -> bool:
        return self.info is None or self.info.is_main


def start(tp: int, cfg: Config) -> Launch:
    """Process groups for a launch of several processes (torchrun, srun); nothing for one plain process."""
    if launch_world_size() == 1:
        return Launch(torch.device("cuda" if torch.cuda.is_available() else "cpu"), None, None)
    from megatron.core import parallel_state

    from tokenformer_dist.distributed.launch import init_distributed

    info = init_distributed(tp, cfg.parallel.dist_timeout_minutes, seed=cfg.train.seed)
    return Launch(info.device, parallel_state.get_tensor_model_parallel_group(), info)


def finish(launch: Launch | None) -> None:
    if launch is not None and launch.info is not None:
        from tokenformer_dist.distributed.launch import destroy_distributed

        destroy_distributed()


def load_model(ckpt: str | Path, device: torch.device | str = "cpu",
               tp_group: torch.distributed.ProcessGroup | None = None) -> torch.nn.Module:
    """The model of a run / checkpoint / weights dir, written at any TP degree, in eval mode: whole on one
    device (no process group needed), or this rank's part under `tp_group` (only that part is allocated)."""
    from tokenformer_dist.checkpoint.engine import load_weights_resharded, read_config, resolve_checkpoint
    from tokenformer_dist.model.tokenformer import TokenFormer

    path = resolve_checkpoint(ckpt)
    cfg = read_config(path).model
    if tp_group is not None and tp_group.size() > 1:
        from tokenformer_dist.model.tensor_parallel import build_parallel_model

        model = build_parallel_model(cfg, tp_group, init_weights=False, device=device)
    else:
        model = TokenFormer(cfg, init_weights=False).to(device)
    load_weights_resharded(model, path)
    return model.eval()
