"""Validation loss over a dataset's val split.

    python -m tokenformer_dist.evaluate --ckpt PATH --data DIR [--json]                         # TP 1
    torchrun --nproc_per_node N -m tokenformer_dist.evaluate --ckpt PATH --data DIR [--tp T] [--json]

PATH: a run directory (its latest checkpoint), one trainer checkpoint, or a weights dir, written at any TP
degree and ZeRO stage: plain `python` runs at TP 1, a launch of N processes at --tp (default: the largest degree
dividing N and the checkpoint's TP), resharding on load (launch.py). With --json the last line is
{"loss": ..., "ppl": ..., "tokens": ...}.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from tqdm import tqdm

from tokenformer_dist.distributed import comm
from tokenformer_dist.model.attention import pair_batch_multiple


@torch.no_grad()
def evaluate(model: torch.nn.Module, data_dir: str, seq_len: int, micro_batch: int,
             max_batches: int | None = None, split: str = "val", progress: bool = False) -> dict[str, float]:
    """Mean next-token loss over the first windows of `split` (collective over the whole world).

    Windows are taken in file order, not shuffled; max_batches caps the GLOBAL number of windows at
    max_batches·micro_batch, so the result does not depend on the DP size. DP rank r evaluates windows
    r, r+dp, ...; TP ranks of one group evaluate the same windows. Returns loss, ppl, tokens.
    Losses are summed on the device; the one host sync is the final read.
    """
    from tokenformer_dist.data import TokenShards

    shards = TokenShards(data_dir, split)
    n = shards.n_windows(seq_len)
    if max_batches is not None:
        n = min(n, max_batches * micro_batch)
    if n <= 0:
        raise ValueError(f"{data_dir}: split {split!r} has no window of {seq_len + 1} tokens")
    dp, dp_rank, tp, dp_group = 1, 0, 1, None  # one plain process: no process group, no megatron-core
    if comm.is_distributed():
        from megatron.core import parallel_state

        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        tp, dp_group = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_group()
    n_heads = getattr(getattr(model, "cfg", None), "n_heads", 1)
    mine = list(range(dp_rank, n, dp))
    # every rank of a TP group must run the same number of batches of the same size
    n_batches = math.ceil(math.ceil(n / dp) / micro_batch)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    multiple = pair_batch_multiple(n_heads, tp)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    bar = tqdm(range(n_batches), desc="eval", disable=not progress, leave=False)
    for b in bar:
        idx = mine[b * micro_batch:(b + 1) * micro_batch]
        real = len(idx)
        size = -(-max(real, 1) // multiple) * multiple  # padded to a size the attention partition accepts
        rows = [shards.window(i, seq_len) for i in idx]
        filler = shards.window(0, seq_len)
        rows += [filler] * (size - real)  # padding rows, weighted 0 below
        batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device, non_blocking=True)
        logits = model(batch[:, :-1])
        losses = model.token_losses(logits, batch[:, 1:])  # [size, s] fp32
        if real:
            loss_sum += losses[:real].double().sum()
            count += real * seq_len
    model.train(was_training)
    totals = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=device)])
    if dp > 1:
        totals = comm.all_reduce_sum(totals, group=dp_group)
    loss_total, tokens = totals.tolist()
    loss = loss_total / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


def main(argv: list[str] | None = None) -> int:
    from tokenformer_dist.checkpoint.engine import open_checkpoint
    from tokenformer_dist.cli import ArgumentParser, user_error
    from tokenformer_dist.data import TokenShards
    from tokenformer_dist.inference import launch as tp_launch

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or weights dir (any TP, any ZeRO)")
    parser.add_argument("--data", required=True, help="built dataset dir (uses its val split)")
    parser.add_argument("--tp", type=int, default=None, help="TP degree (plain python: 1; under torchrun, "
                                                             "default: the largest dividing N and the checkpoint's)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: train.micro_batch_size")
    parser.add_argument("--batches", type=int, default=None, help="cap on micro-batches (default: all)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args(argv)
    launch = None
    try:
        for flag, value in (("--micro-batch", args.micro_batch), ("--batches", args.batches)):
            if value is not None and value <= 0:
                raise ValueError(f"{flag} {value}: must be a positive integer")
        ckpt, cfg, ckpt_tp = open_checkpoint(args.ckpt)
        tp = tp_launch.choose_tp(args.tp, ckpt_tp, cfg, tp_launch.launch_world_size())
        TokenShards(args.data, args.split)  # a bad --data or --split fails here, before any process group
        launch = tp_launch.start(tp, cfg)
        model = tp_launch.load_model(ckpt, launch.device, launch.tp_group)
        result = evaluate(model, args.data, cfg.model.seq_len, args.micro_batch or cfg.train.micro_batch_size,
                          args.batches, split=args.split, progress=launch.is_main)
    except (ValueError, OSError) as e:  # DatasetError, ConfigError and launch.LaunchError are ValueErrors
        tp_launch.finish(launch)
        return user_error(e)
    if launch.is_main:
        print(f"{ckpt} (written at tp {ckpt_tp}, evaluated at tp {tp}): {args.split} loss {result['loss']:.4f}  "
              f"ppl {result['ppl']:.2f}  tokens {result['tokens']}  (fp32 master weights)")
        if args.json:
            print(json.dumps(result))
    tp_launch.finish(launch)
    return 0
