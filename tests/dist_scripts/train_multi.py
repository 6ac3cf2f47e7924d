"""Run several trainer invocations one after another in ONE torchrun launch (start-up is most of the cost).

usage: train_multi.py JSON   where JSON is a list of argv lists for `python -m tokenformer_dist.train`.
torch.distributed stays up between runs; megatron's TP/DP groups are rebuilt for each run's TP. A run that
stops with the trainer's one-line error (what `python -m tokenformer_dist.train` would print, exit 2) is
reported the same way and the next run starts; the launch then exits 2.

With TRAIN_MULTI_REPORT=DIR each rank also keeps DIR/rank<R>.json up to date: one {"code", "error"} per run
finished so far. Tests read what each rank saw from there: several ranks' stderr share one pipe, where a
line can arrive glued to another process's unfinished one.
"""

import json
import os
import sys
from pathlib import Path

from megatron.core import parallel_state

from tokenformer_dist.config import ConfigError
from tokenformer_dist.distributed.launch import destroy_distributed
from tokenformer_dist.training.cli import parse_args, resolve_config, train

report_dir = os.environ.get("TRAIN_MULTI_REPORT")
if report_dir:
    Path(report_dir).mkdir(parents=True, exist_ok=True)
outcomes: list[dict] = []
for argv in json.loads(sys.argv[1]):
    args = parse_args(argv)
    try:
        outcomes.append({"code": train(args, resolve_config(args), destroy=False), "error": None})
    except (ConfigError, ValueError) as e:  # as train.main: every rank stopped together, the groups are intact
        print(f"error: {e}", file=sys.stderr, flush=True)
        outcomes.append({"code": 2, "error": str(e)})
        parallel_state.destroy_model_parallel()  # train() does this on success; the next run may use another TP
    if report_dir:
        Path(report_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(outcomes))
destroy_distributed()
sys.exit(max(outcome["code"] for outcome in outcomes))
