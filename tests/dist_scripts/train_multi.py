"""Run several trainer invocations one after another in ONE torchrun launch (start-up is most of the cost).

usage: train_multi.py JSON   where JSON is a list of argv lists for `python -m tokenformer_dist.train`.
torch.distributed stays up between runs; megatron's TP/DP groups are rebuilt for each run's TP.
"""

import json
import sys

from tokenformer_dist.parallel import destroy_distributed
from tokenformer_dist.train import parse_args, resolve_config, train

codes = []
for argv in json.loads(sys.argv[1]):
    args = parse_args(argv)
    codes.append(train(args, resolve_config(args), destroy=False))
destroy_distributed()
sys.exit(max(codes))
