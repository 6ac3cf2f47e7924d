"""Process groups: distributed start-up (torchrun or Slurm), megatron-core parallel_state, the DeepSpeed mpu.

Rank layout (megatron-core's order): consecutive ranks form a tensor-parallel group, so a TP group stays
inside one node; data parallelism runs across TP groups. DeepSpeed ZeRO partitions over the DP group only.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tokenformer_dist.cpu_compat import apply_cpu_shims


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's host-list syntax expanded as `scontrol show hostnames` does: `node[01-03,07],gpu-a[1-2]b[3-4]`.

    Ranges keep their zero padding; several bracket groups in one name multiply out (in order).
    """
    names: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(hostlist + ","):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            if hostlist[start:i].strip():
                names.extend(_expand_one(hostlist[start:i].strip()))
            start = i + 1
    return names


def _expand_one(name: str) -> list[str]:
    if "[" not in name:
        return [name]
    head, _, rest = name.partition("[")
    body, _, tail = rest.partition("]")
    values: list[str] = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            values.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    return [head + v + t for v in values for t in _expand_one(tail)]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              check=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return expand_hostlist(nodelist)[0]  # no scontrol on this node: the same expansion in Python


def check_tp_within_node(tp: int, world_size: int, ranks_per_node: int | None, node: int | None = None,
                         rank: int | None = None) -> None:
    """Refuse a layout whose tensor-parallel groups would straddle nodes (TP traffic belongs on NVLink).

    TP groups are runs of `tp` consecutive ranks and a node holds `ranks_per_node` consecutive ranks, so
    the groups stay inside nodes iff `tp` divides `ranks_per_node`. Given this rank's `node` index too, it
    also checks that the launcher really placed the ranks node by node.
    """
    if ranks_per_node is None or ranks_per_node >= world_size:
        return  # one node
    if ranks_per_node % tp:
        raise ValueError(f"--tp {tp} does not fit the {ranks_per_node} ranks per node: a TP group must stay "
                         f"inside one node; valid: a divisor of {ranks_per_node}")
    if node is not None and rank is not None and rank // ranks_per_node != node:
        raise ValueError(f"rank {rank} runs on node {node}, not node {rank // ranks_per_node}: ranks must be "
                         "placed node by node (srun --distribution=block) for TP groups to stay inside a node")


def _node_layout() -> tuple[int | None, int | None]:
    """(ranks per node, this rank's node index) from torchrun or srun, (None, None) when unknown."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:  # torchrun: GROUP_RANK is the agent's (node's) index
        return int(env["LOCAL_WORLD_SIZE"]), int(env["GROUP_RANK"]) if "GROUP_RANK" in env else None
    if "SLURM_NTASKS_PER_NODE" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_NTASKS_PER_NODE"]), int(env["SLURM_NODEID"]) if "SLURM_NODEID" in env else None
    return None, None


def env_from_launcher() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from Slurm when not launched by torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # torchrun, the deepspeed launcher, or the user
    if "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        # a port derived from the job id lets two jobs share a node
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed(tp: int, timeout_minutes: float = 10.0) -> DistInfo:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's TP/DP groups.

    Works under torchrun, the deepspeed launcher, srun, or as a single plain process.
    """
    env_from_launcher()
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % tp:
        raise ValueError(f"--tp {tp} does not divide the world size {world_size}; valid: a divisor of it")
    check_tp_within_node(tp, world_size, *_node_layout(), rank=int(os.environ["RANK"]))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        apply_cpu_shims()
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, distributed_timeout_minutes=int(max(1, timeout_minutes))
        )
    return current_info(device, backend)


def current_info(device: torch.device | None = None, backend: str | None = None) -> DistInfo:
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                          else torch.device("cpu")),
        backend=backend or dist.get_backend(),
    )


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed expects, backed by megatron-core parallel_state.

    DeepSpeed calls get_model_parallel_* (which parallel_state lacks); with this adapter ZeRO partitions
    optimizer state over the data-parallel group only and reduces gradient norms over the model group.
    """

    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)

    @staticmethod
    def get_pipeline_model_parallel_world_size() -> int:
        return 1

    @staticmethod
    def get_sequence_parallel_world_size() -> int:
        return 1

