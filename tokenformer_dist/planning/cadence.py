"""How often to checkpoint, and how much warning a job needs before its time limit, from what one save writes
and the planner's step time.

    python -m tokenformer_dist.cadence --config CONFIG --nodes N --gpus-per-node G [--gpu auto|h100|...]
        [--lead-seconds]

prints the save time, its share of training time at `train.save_every`, the `save_every` that keeps the share
at MAX_SAVE_SHARE, the time from a stop signal to the trainer's exit (what Slurm's KillWait must cover) and
the lead for the time-limit warning; with --lead-seconds only that lead, in whole seconds (slurm/common.sh).

What one save writes (tokenformer_dist/checkpoint/engine.py), with P parameters, w bytes per weight (2 bf16, 4 fp32):
  DeepSpeed model states  w·P, by DP rank 0 of each TP rank (node 0); none at ZeRO 3 (weights live in the
                          optimizer partitions there)
  optimizer states        12·P (fp32 master, Adam m and v), spread over the DP ranks (ZeRO >= 1: 1/nodes of
                          it on each node), all on DP rank 0 at ZeRO 0
  model_tp*.safetensors   4·P fp32 masters, by DP rank 0 of each TP rank (node 0)
Node 0 writes the most; the save takes its bytes at WRITE_BYTES_PER_S plus SAVE_OVERHEAD_S. Both are
assumptions about the cluster's filesystem, not measurements (pass --write-gbps for yours).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from tokenformer_dist.config import Config, ConfigError, load_config, param_count

MAX_SAVE_SHARE = 0.02  # saving may cost at most this share of training time
WRITE_BYTES_PER_S = 1e9  # per node to the shared filesystem: a conservative client rate (Lustre/GPFS/NFS, 100 Gb/s+)
SAVE_OVERHEAD_S = 2.0  # per save: barriers, the gathers of the fp32 masters, file creation, the renames
EXIT_OVERHEAD_S = 15.0  # after the save: DeepSpeed and torch.distributed teardown, process exit
LEAD_MARGIN_S = 120.0  # the time-limit warning's slack beyond the exit time: slower steps or filesystem
ADAM_STATE_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq per parameter
MASTER_BYTES = 4  # fp32 masters in model_tp*.safetensors
SAVE_EVERY_ROUNDING = 500


@dataclass(frozen=True)
class Cadence:
    node0_bytes: float  # what node 0 writes per save
    total_bytes: float  # what all nodes write per save
    save_s: float
    step_s: float  # the planner's
    save_every: int  # the config's
    share: float  # of training time spent saving at save_every
    save_every_for_share: int  # the smallest multiple of SAVE_EVERY_ROUNDING with share <= MAX_SAVE_SHARE
    exit_s: float  # stop signal -> checkpoint written -> process gone (KillWait must cover it)
    lead_s: float  # the time-limit warning's lead (exit_s + LEAD_MARGIN_S)


def weight_bytes(cfg: Config, gpu: str) -> int:
    """Bytes per weight of the model dtype the trainer uses (`parallel.dtype` auto: bf16 on a GPU)."""
    dtype = cfg.parallel.dtype
    return 4 if dtype == "fp32" or (dtype == "auto" and gpu == "cpu") else 2


def checkpoint_bytes(cfg: Config, nodes: int, gpu: str) -> tuple[float, float]:
    """(bytes node 0 writes, bytes all nodes write) per save (module docstring)."""
    params = param_count(cfg.model)
    zero = cfg.parallel.zero_stage
    model_states = 0 if zero == 3 else weight_bytes(cfg, gpu) * params
    optimizer = ADAM_STATE_BYTES * params
    masters = MASTER_BYTES * params
    node0 = model_states + masters + (optimizer / nodes if zero >= 1 else optimizer)
    return float(node0), float(model_states + optimizer + masters)


def save_seconds(node0_bytes: float, write_bytes_per_s: float = WRITE_BYTES_PER_S) -> float:
    return node0_bytes / write_bytes_per_s + SAVE_OVERHEAD_S


def save_share(save_s: float, step_s: float, save_every: int) -> float:
    """Share of wall time spent saving when a save follows every `save_every` steps."""
    return save_s / (save_every * step_s + save_s)


def save_every_for(save_s: float, step_s: float, share: float = MAX_SAVE_SHARE) -> int:
    """Smallest multiple of SAVE_EVERY_ROUNDING at which saving costs at most `share` of training time."""
    steps = save_s * (1 - share) / (share * step_s)
    return max(1, math.ceil(steps / SAVE_EVERY_ROUNDING)) * SAVE_EVERY_ROUNDING


def planner_step_s(cfg: Config, nodes: int, gpus_per_node: int, gpu: str) -> float:
    """The planner's step time for the config's own layout (TP, micro-batch, ZeRO, checkpointing)."""
    from tokenformer_dist.planning.plan import plan

    p = cfg.parallel
    est = plan(cfg, nodes, gpus_per_node, gpu, tp=p.tp, micro_batch=cfg.train.micro_batch_size,
               zero_stage=p.zero_stage, checkpointing=p.activation_checkpointing)
    return est[0].step_s


def cadence(cfg: Config, nodes: int, gpus_per_node: int, gpu: str,
            write_bytes_per_s: float = WRITE_BYTES_PER_S) -> Cadence:
    t = cfg.train
    step_s = planner_step_s(cfg, nodes, gpus_per_node, gpu)
    node0, total = checkpoint_bytes(cfg, nodes, gpu)
    save_s = save_seconds(node0, write_bytes_per_s)
    dp = max(1, nodes * gpus_per_node // cfg.parallel.tp)
    # a validation pass may start in the window: its forwards (a third of a step each) over this rank's share
    eval_s = math.ceil(t.eval_batches / dp) * step_s / (3 * t.grad_accum_steps)
    # the step in flight, up to preempt_check_every more before the ranks agree to stop, validation, the save
    exit_s = (t.preempt_check_every + 1) * step_s + eval_s + save_s + EXIT_OVERHEAD_S
    return Cadence(node0, total, save_s, step_s, t.save_every, save_share(save_s, step_s, t.save_every),
                   save_every_for(save_s, step_s), exit_s, exit_s + LEAD_MARGIN_S)


def planner_gpu(device: torch.device) -> str | None:
    """The planner's name for this device ("cpu", "h100", ...), None for a GPU it has no figures for."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).upper()
    return next((key for key in ("h200", "h100", "a100") if key.upper() in name), None)


def startup_line(cfg: Config, world_size: int, ranks_per_node: int | None, device: torch.device) -> str:
    """What the trainer prints at start-up about its checkpoint cadence."""
    gpu = planner_gpu(device)
    per_node = min(ranks_per_node or world_size, world_size)
    nodes = max(1, world_size // per_node)
    if gpu is None:
        return f"checkpoint every {cfg.train.save_every} steps (the planner has no step time for this GPU)"
    try:
        c = cadence(cfg, nodes, per_node, gpu)
    except ValueError as e:  # a layout the planner refuses (e.g. TP across its notion of a node)
        return f"checkpoint every {cfg.train.save_every} steps (no planner estimate: {e})"
    if not math.isfinite(c.step_s):
        return f"checkpoint every {cfg.train.save_every} steps (no planner estimate for this layout)"
    return (f"checkpoint every {c.save_every} steps: ~{c.node0_bytes / 1e9:.2f} GB from node 0, ~{c.save_s:.1f} s "
            f"per save at {WRITE_BYTES_PER_S / 1e9:g} GB/s = {c.share:.1%} of training time at the planner's "
            f"{c.step_s:.3f} s/step ({nodes} x {per_node} {gpu}; <= {MAX_SAVE_SHARE:.0%} from save_every "
            f"{c.save_every_for_share})")


def main(argv: list[str] | None = None) -> int:
    from tokenformer_dist.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node (0: CPU, see --ranks)")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="CPU jobs: ranks per node")
    parser.add_argument("--gpu", default="auto", help="h100, h200, a100, cpu, or auto (this machine's GPU 0; "
                                                      "a GPU the planner does not know counts as a100, its slowest)")
    parser.add_argument("--write-gbps", type=float, default=WRITE_BYTES_PER_S / 1e9,
                        help="per-node write rate to the shared filesystem, GB/s")
    parser.add_argument("--lead-seconds", action="store_true", help="print only the time-limit warning's lead")
    args = parser.parse_args(argv)
    per_node = args.gpus_per_node or args.ranks_per_node or 1
    gpu = args.gpu
    if gpu == "auto":
        gpu = "cpu" if args.gpus_per_node == 0 or not torch.cuda.is_available() else (
            planner_gpu(torch.device("cuda", 0)) or "a100")
    try:
        if args.nodes < 1 or per_node < 1 or args.write_gbps <= 0:
            raise ValueError(f"--nodes {args.nodes}, ranks per node {per_node}, --write-gbps {args.write_gbps}: "
                             "each must be > 0")
        cfg = load_config(args.config)
        c = cadence(cfg, args.nodes, per_node, gpu, args.write_gbps * 1e9)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.lead_seconds:
        print(math.ceil(c.lead_s))
        return 0
    print(f"{cfg.source} on {args.nodes} x {per_node} {gpu}: planner step {c.step_s:.4f} s; a save writes "
          f"{c.total_bytes / 1e9:.2f} GB, {c.node0_bytes / 1e9:.2f} GB from node 0: ~{c.save_s:.1f} s at "
          f"{args.write_gbps:g} GB/s per node")
    print(f"save_every {c.save_every}: {c.share:.2%} of training time; <= {MAX_SAVE_SHARE:.0%} from save_every "
          f"{c.save_every_for_share}")
    print(f"stop signal -> exit: ~{c.exit_s:.0f} s (KillWait must be at least this); time-limit warning lead "
          f"{math.ceil(c.lead_s)} s")
    return 0
