"""Run several trainer invocations one after another in ONE torchrun launch (start-up is most of the cost).

usage: train_multi.py JSON   where JSON is a list of argv lists for `python -m tokenformer_dist.train`.
torch.distributed stays up between runs; megatron's TP/DP groups are rebuilt for each run's TP. A run that
stops with the trainer's one-line error (what `python -m tokenformer_dist.train` would print, exit 2) is
reported the same way and the next run starts; the launch then exits 2.
"""

import json
import sys

from megatron.core import parallel_state

from tokenformer_dist.config import ConfigError
from tokenformer_dist.distributed.launch import destroy_distributed
from tokenformer_dist.training.cli import parse_args, resolve_config, train

codes = []
for argv in json.loads(sys.argv[1]):
    args = parse_args(argv)
    try:
        codes.append(train(args, resolve_config(args), destroy=False))
    except (ConfigError, ValueError) as e:  # as train.main: every rank stopped together, the groups are intact
        print(f"error: {e}", file=sys.stderr, flush=True)
        codes.append(2)
        parallel_state.destroy_model_parallel()  # train() does this on success; the next run may use another TP
destroy_distributed()
sys.exit(max(codes))
