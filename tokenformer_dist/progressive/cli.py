"""python tools/progressive_experiment.py [--data DIR] [--out DIR] [--budget full|small|test]
    [--config configs/progressive_mini.yaml] [--overwrite | --resume]

Exit 2: bad ladder config or arguments (one line, nothing launched); 1: a run failed (its log's tail)."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tokenformer_dist.atomic import atomic_write_text
from tokenformer_dist.cli import ArgumentParser
from tokenformer_dist.config import ConfigError
from tokenformer_dist.progressive import accounting as acc
from tokenformer_dist.progressive.experiment import collect, execute, mark_reused, plan, run_record
from tokenformer_dist.progressive.ladder import REPO, load_ladder
from tokenformer_dist.progressive.report import headline, markdown, plot
from tokenformer_dist.progressive.runner import StepFailed, build_dataset, say

DEFAULT_CONFIG = REPO / "configs" / "progressive_mini.yaml"


def _manifest(data: Path) -> dict[str, Any]:
    try:
        return json.loads((data / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data {data}: not a dataset built by data_prep/build.py ({e})") from None


def _dataset_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the dataset is, from its manifest.json (data_prep/build.py), for the report to name it by: its
    inputs by name (never by path), the text they held, its tokenizer."""
    tok = manifest.get("tokenizer", {})
    return {"sample": bool(manifest.get("sample")), "inputs": [Path(i["path"]).name for i in manifest["inputs"]],
            "text_bytes": manifest.get("counts", {}).get("text_bytes"),
            "tokenizer": tok.get("model_type") if tok.get("trained") else None,
            "vocab_size": int(manifest["vocab_size"])}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="The progressive-scaling experiment in miniature: scratch, "
                                     "no_growth, grow_exact and grow_official at matched compute, over seeds.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="ladder config (configs/progressive_mini.yaml)")
    parser.add_argument("--data", default=None, help="built dataset dir (default: the ladder's data.path, built "
                                                     "with data_prep/build.py's sample mode if missing)")
    parser.add_argument("--out", default="runs/progressive", help="output dir (default runs/progressive)")
    parser.add_argument("--budget", default="full", help="a budget of the ladder config (full, small, test)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --out first")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted experiment in --out: finished runs are kept, a run with a "
                             "checkpoint continues from it (same --config and --budget needed)")
    args = parser.parse_args(argv)
    # SIGTERM (kill, Slurm) unwinds like Ctrl-C, so the runner terminates the subprocesses it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.time()
    out = Path(args.out).resolve()
    try:
        ladder = load_ladder(args.config)
        if args.budget not in ladder.budgets:
            raise ConfigError(f"--budget {args.budget!r}: valid budgets of {ladder.source}: "
                              f"{', '.join(ladder.budgets)}")
        if args.resume and args.overwrite:
            raise ConfigError("--resume and --overwrite: choose one (continue --out, or delete it first)")
        if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
            raise ConfigError(f"--out {out}: exists and is not empty; pass --resume to continue it, --overwrite to "
                              "delete it, or choose another --out")
        data = Path(args.data) if args.data else REPO / ladder.data_path
        data = data.resolve()
        if data.exists() and not (data / "manifest.json").is_file():
            raise ConfigError(f"--data {data}: exists but has no manifest.json (not a built dataset)")
        vocab = int(_manifest(data)["vocab_size"]) if data.exists() else int(ladder.data_build.get("vocab_size", 8192))
        vocab = -(-vocab // ladder.tp) * ladder.tp  # the embedding's rows are sharded over TP
        plan(ladder, args.budget, out, str(data), vocab)  # validates every run's trainer config before the build
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if not data.exists():
            build_dataset(data, ladder.data_build)
        manifest = _manifest(data)
        vocab = -(-int(manifest["vocab_size"]) // ladder.tp) * ladder.tp
        runs = plan(ladder, args.budget, out, str(data), vocab)
        reused = mark_reused(runs) if args.resume else 0
        seeds = ladder.seeds(args.budget)
        per_seed = [r for r in runs if r.seed == seeds[0]]
        flops = {r.key.split("/", 1)[1]: r.flops for r in per_seed}
        say(f"progressive experiment, budget {args.budget!r}, seeds {seeds}, {len(runs)} trainer launches "
            f"({ladder.jobs} at a time, TP {ladder.tp}); per seed: " +
            ", ".join(f"{k} {r.cfg.train.steps} steps {f:.3g} FLOPs" for (k, f), r in
                      zip(flops.items(), per_seed, strict=True)) +
            (f"; --resume: {reused} of {len(runs)} runs already finished" if args.resume else ""))
        execute(runs, ladder, args.resume)
        res: dict[str, Any] = {"budget": args.budget, **collect(runs, ladder, args.budget)}
    except ConfigError as e:  # --resume found a run of another config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StepFailed as e:
        print(e, file=sys.stderr)
        return 1
    first = per_seed[0].cfg
    res["runs"] = [run_record(r) for r in per_seed]
    res["settings"] = {
        "ladder_config": ladder.source, "data": str(data), "dataset": _dataset_facts(manifest), "vocab_size": vocab,
        "train_tokens_available": manifest["splits"]["train"]["tokens"], "d_model": first.model.d_model,
        "n_layers": first.model.n_layers, "n_heads": first.model.n_heads, "seq_len": first.model.seq_len,
        "tokens_per_step": acc.tokens_per_step(first), "tp": ladder.tp, "jobs": ladder.jobs,
        "scale": ladder.budgets[args.budget].scale, "eval_batches": first.train.eval_batches,
        "flops_convention": "training = 3 x forward, tokenformer_dist.model.flops.flops_per_token",
        "data_order": "data.seed = 100*seed + stage index: scratch and stage 1 share one order, no_growth and the "
                      "ladders' stage 2 another",
        "post_growth_bump": "first val loss of the grown stage - final val loss of the stage before"}
    res["wall_s"] = {"total": round(time.time() - t_start, 1),
                     "trainer_launches": round(sum(r.wall_s for r in runs), 1),
                     "growth": round(sum(r.expand_s for r in runs), 1),
                     "runs_reused": reused}  # --resume: their times are those of the invocation that ran them
    res["headline"] = headline(res)
    plot(res, out / "progressive.png")
    atomic_write_text(out / "results.md", markdown(res))
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")  # last: its presence means complete
    say(f"wrote {out}/results.json, results.md, progressive.png in {res['wall_s']['total']:.0f} s")
    say(res["headline"])
    return 0
