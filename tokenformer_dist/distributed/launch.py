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

from tokenformer_dist.distributed import comm
from tokenformer_dist.distributed.comm import LaunchError  # defined there: the ranks' agreement raises it too
from tokenformer_dist.distributed.cpu_compat import apply_cpu_shims
from tokenformer_dist.distributed.net import job_port


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
        raise ValueError(f"parallel.tp (--tp) {tp} does not fit the {ranks_per_node} ranks per node: a TP group "
                         f"must stay inside one node; valid: a divisor of {ranks_per_node}")
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


def ranks_per_node() -> int | None:
    """Ranks on each node, from torchrun or srun; None when unknown (then one node is assumed)."""
    return _node_layout()[0]


def env_from_launcher() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from Slurm when not launched by torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # torchrun, the deepspeed launcher, or the user
    if "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        # a port derived from the job id lets two jobs share a node (the rule slurm/common.sh uses too)
        os.environ.setdefault("MASTER_PORT", str(job_port(int(os.environ.get("SLURM_JOB_ID", "0")))))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


# Environment variables through which Slurm or a launcher hands a task GPUs.
GPU_ENV_VARS = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_JOB_GPUS",
                "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")


def _names_gpus(var: str, value: str) -> bool:
    """Whether `var=value` hands the task at least one GPU. Counts (SLURM_GPUS*, possibly "a100:8") of 0 do
    not; device lists (CUDA_VISIBLE_DEVICES, SLURM_*_GPUS) do unless empty, "-1" or "NoDevFiles"."""
    value = value.strip()
    if value in ("", "-1", "NoDevFiles"):
        return False
    if var.startswith("SLURM_GPUS"):
        count = value.split(",")[0].rsplit(":", 1)[-1].split("(")[0]
        return not (count.isdigit() and int(count) == 0)
    return True


def check_gpu_environment(cuda_available: bool | None = None) -> None:
    """Fail fast when the job was given GPUs but torch cannot use CUDA.

    Why: a CPU-only torch build (or a broken driver) would otherwise train in fp32 over gloo on the CPU,
    silently, for the whole allocation. Set TOKENFORMER_DIST_ALLOW_CPU=1 to run on the CPU anyway.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available or os.environ.get("TOKENFORMER_DIST_ALLOW_CPU") == "1":
        return
    given = {k: os.environ[k] for k in GPU_ENV_VARS if _names_gpus(k, os.environ.get(k, ""))}
    if given:
        k, v = next(iter(given.items()))
        raise LaunchError(f"the job was given GPUs ({k}={v}) but torch.cuda is not available (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); install a CUDA torch "
                          f"or set TOKENFORMER_DIST_ALLOW_CPU=1 to train on the CPU")


def device_index(local_rank: int, visible_devices: int) -> int:
    """Index among the visible GPUs of the rank with this local rank: local_rank mod visible devices. Right
    both for 8 tasks sharing a node's 8 visible GPUs (slurm/common.sh: no per-task binding) and for per-task
    binding (each task sees one device, index 0); tests/test_slurm.py checks both on emulated GPUs."""
    return local_rank % visible_devices


def local_device(local_rank: int) -> torch.device:
    return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))


def init_distributed(tp: int, timeout_minutes: float = 60.0, seed: int | None = None) -> DistInfo:
    """Start torch.distributed and megatron-core's TP/DP groups; register the compute device with `comm`.

    Works under torchrun, the deepspeed launcher, srun, or as a single plain process. On GPU every group is
    NCCL only: the default group is bound to this rank's device (`device_id`: NCCL connects at start-up, and
    a bad node fails here rather than in the first step), megatron's groups inherit NCCL (they are created
    with backend=None), and no gloo group exists. A `cpu:gloo,cuda:nccl` default would give every megatron
    group an eagerly connected gloo mesh too, which stalls on nodes whose hostname resolves to 127.0.1.1;
    nothing the trainer runs on GPU issues a CPU collective (comm.py moves tensors to the device; DeepSpeed
    does the same; docs/slurm.md lists what was read). On CPU everything is gloo. The timeout bounds every
    collective, including the wait of the other ranks while rank 0 converts a checkpoint to DeepSpeed's
    universal format (parallel.dist_timeout_minutes). `seed` also seeds megatron's CUDA RNG tracker on GPU.
    """
    env_from_launcher()
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % tp:
        raise ValueError(f"parallel.tp (--tp) {tp} does not divide the world size {world_size}; valid: a divisor of it")
    check_tp_within_node(tp, world_size, *_node_layout(), rank=int(os.environ["RANK"]))
    check_gpu_environment()
    cuda = torch.cuda.is_available()
    if cuda:
        device = local_device(local_rank)
        torch.cuda.set_device(device)
        backend, device_id = "nccl", device
    else:
        apply_cpu_shims()
        device, backend, device_id = torch.device("cpu"), "gloo", None
    comm.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device_id)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, distributed_timeout_minutes=int(max(1, timeout_minutes)),
            create_gloo_process_groups=False,  # megatron's gloo twins serve its distributed optimizer, unused here
        )
    if seed is not None:
        seed_all(seed)
    return current_info()


def seed_all(seed: int) -> None:
    """torch's CPU generator and, on GPU, megatron's CUDA RNG tracker (default + tensor-parallel states)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def current_info() -> DistInfo:
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=comm.device(),
        backend=dist.get_backend(),
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

