"""The checkpoint cadence and stop times of the OWT ladder's stages on their Slurm layout (8 nodes x 8 H100),
as tokenformer_dist/planning/cadence.py derives them from each config and the planner's step time (the figures in
docs/slurm.md and docs/training.md).

    python bench/bench_save_cadence.py [--nodes 8] [--gpus-per-node 8] [--gpu h100] [--write-gbps 1]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tokenformer_dist.config import load_config, param_count
from tokenformer_dist.planning import cadence

REPO = Path(__file__).resolve().parents[1]
STAGES = ("owt_124m", "owt_354m", "owt_757m", "owt_1p4b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--write-gbps", type=float, default=cadence.WRITE_BYTES_PER_S / 1e9)
    args = parser.parse_args()
    print(f"{args.nodes} x {args.gpus_per_node} {args.gpu}, {args.write_gbps:g} GB/s per node to the shared "
          f"filesystem, {cadence.SAVE_OVERHEAD_S:g} s per save besides, saving <= {cadence.MAX_SAVE_SHARE:.0%}")
    print("| stage | parameters | a save writes (node 0) | save | planner step | save_every | share | save_every "
          "for 2% | stop -> exit (KillWait >=) | warning lead |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stage in STAGES:
        cfg = load_config(REPO / "configs" / f"{stage}.yaml")
        c = cadence.cadence(cfg, args.nodes, args.gpus_per_node, args.gpu, args.write_gbps * 1e9)
        print(f"| {stage} | {param_count(cfg.model) / 1e6:,.0f}M | {c.total_bytes / 1e9:.1f} GB "
              f"({c.node0_bytes / 1e9:.1f} GB) | {c.save_s:.1f} s | {c.step_s:.3f} s | {c.save_every} | "
              f"{c.share:.1%} | {c.save_every_for_share} | {c.exit_s:.0f} s | {math.ceil(c.lead_s)} s |")


if __name__ == "__main__":
    main()
