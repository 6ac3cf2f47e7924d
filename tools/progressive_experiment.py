"""The progressive-scaling experiment in miniature: a TokenFormer ladder against the largest model from scratch.

    python tools/progressive_experiment.py [--data DIR] [--out DIR] [--budget small|full|test]
        [--config configs/progressive_mini.yaml] [--overwrite]

Runs (a) the ladder's largest model from scratch and (b) the progressive ladder (train stage 1, grow its
parameter tokens with tools/expand_tokens.py, train stage 2 from the grown weights, ...), every run one
torchrun launch of the real trainer at TP `tp`. Cumulative training FLOPs = Σ steps · tokens/step ·
metrics.flops_per_token(stage model); an expansion costs no training FLOPs. Writes OUT/results.json
(`compute_ratio` = ladder FLOPs to first reach the scratch run's final val loss / scratch FLOPs, linear
interpolation between eval points; null if never reached), OUT/results.md and OUT/progressive.png.
Exit 2: bad ladder config or arguments (one line); 1: a run failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenformer_dist.config import Config, ConfigError, load_config, param_count, read_yaml  # noqa: E402
from tokenformer_dist.metrics import flops_per_token  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "progressive_mini.yaml"
KINDS = ("qkv", "proj", "ffn")
INIT_MODES = ("exact", "official")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# trainer keys the ladder owns per run; setting them in trainer_overrides would be silently ignored
_RUN_KEYS = {"train.steps", "train.lr", "train.min_lr", "train.warmup_frac", "train.eval_every", "parallel.tp",
             "model.qkv_tokens", "model.proj_tokens", "model.ffn_tokens", "data.path", "model.vocab_size"}


# ----------------------------------------------------------------------------------------------- ladder config
@dataclass
class RunSpec:
    """One training run: a stage of the ladder or the from-scratch run."""

    name: str
    tokens: dict[str, int]
    steps: int
    lr: float
    min_lr: float
    warmup_frac: float


@dataclass
class Ladder:
    source: str
    trainer_config: Path
    trainer_overrides: dict[str, Any]
    data_path: str
    data_build: dict[str, float]
    tp: int
    init: str
    seed: int
    eval_points: int
    stages: list[RunSpec]
    scratch: RunSpec
    budgets: dict[str, dict[str, Any]]


def _req(raw: dict, key: str, where: str, src: str) -> Any:
    if key not in raw:
        raise ConfigError(f"{src}: {where}{key} is required")
    return raw[key]


def _check_keys(raw: Any, valid: tuple[str, ...], where: str, src: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {where.rstrip('.') or 'top level'} must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{src}: unknown key {where}{key} (valid keys: {', '.join(valid)})")
    return raw


def _num(value: Any, key: str, src: str, kind: type = float, positive: bool = True) -> Any:
    if isinstance(value, str) and kind is float:
        try:  # YAML 1.1 reads "3e-3" as a string
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or (positive and value <= 0) or (not positive and value < 0):
        raise ConfigError(f"{src}: {key} must be a {'positive' if positive else 'non-negative'} "
                          f"{'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def _run_spec(raw: Any, where: str, src: str, defaults: dict[str, float], with_tokens: bool) -> RunSpec:
    valid = ("name", "tokens", "steps", "lr", "min_lr", "warmup_frac") if with_tokens else \
        ("steps", "lr", "min_lr", "warmup_frac")
    raw = _check_keys(raw, valid, where, src)
    tokens: dict[str, int] = {}
    if with_tokens:
        tok = _check_keys(_req(raw, "tokens", where, src), KINDS, f"{where}tokens.", src)
        for kind in KINDS:
            tokens[kind] = _num(_req(tok, kind, f"{where}tokens.", src), f"{where}tokens.{kind}", src, int)
    name = str(raw.get("name", "scratch"))
    if not _NAME.match(name):
        raise ConfigError(f"{src}: {where}name {name!r} must match [A-Za-z0-9_.-]+ (it names a run directory)")
    lr = _num(raw.get("lr", defaults["lr"]), f"{where}lr", src)
    min_lr = _num(raw.get("min_lr", defaults["min_lr"]), f"{where}min_lr", src, positive=False)
    warmup = _num(raw.get("warmup_frac", defaults["warmup_frac"]), f"{where}warmup_frac", src, positive=False)
    if min_lr > lr:
        raise ConfigError(f"{src}: {where}min_lr={min_lr} must be <= {where}lr={lr}")
    if warmup >= 1:
        raise ConfigError(f"{src}: {where}warmup_frac must be in [0, 1), got {warmup}")
    steps = _num(_req(raw, "steps", where, src), f"{where}steps", src, int)
    return RunSpec(name, tokens, steps, lr, min_lr, warmup)


def load_ladder(path: str | Path) -> Ladder:
    """Read and validate a ladder config; ConfigError (one line, naming the key) on bad input."""
    src = str(path)
    raw = read_yaml(path, "ladder config")
    raw = _check_keys(raw, ("trainer_config", "trainer_overrides", "data", "tp", "init", "seed", "eval_points",
                            "lr", "min_lr", "warmup_frac", "stages", "scratch", "budgets"), "", src)
    trainer_config = Path(str(_req(raw, "trainer_config", "", src)))
    if not trainer_config.is_absolute():
        trainer_config = REPO / trainer_config
    if not trainer_config.is_file():
        raise ConfigError(f"{src}: trainer_config {raw['trainer_config']!r}: no such file")
    overrides = raw.get("trainer_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{src}: trainer_overrides must be a mapping of dotted trainer keys to values")
    for key in overrides:
        if key in _RUN_KEYS:
            raise ConfigError(f"{src}: trainer_overrides.{key} is set per run by the ladder (stages/scratch/data/tp)")
    data = _check_keys(raw.get("data") or {}, ("path", "sample_mb", "vocab_size", "tokenizer_sample_mb"),
                       "data.", src)
    build = {k: _num(data[k], f"data.{k}", src) for k in ("sample_mb", "vocab_size", "tokenizer_sample_mb")
             if k in data}
    tp = _num(raw.get("tp", 2), "tp", src, int)
    init = raw.get("init", "exact")
    if init not in INIT_MODES:
        raise ConfigError(f"{src}: init must be one of {', '.join(INIT_MODES)}, got {init!r}")
    seed = _num(raw.get("seed", 1234), "seed", src, int, positive=False)
    eval_points = _num(raw.get("eval_points", 10), "eval_points", src, int)
    defaults = {"lr": raw.get("lr", 3e-3), "min_lr": raw.get("min_lr", 3e-4),
                "warmup_frac": raw.get("warmup_frac", 0.02)}
    stages_raw = _req(raw, "stages", "", src)
    if not isinstance(stages_raw, list) or len(stages_raw) < 3:
        raise ConfigError(f"{src}: stages must be a list of at least 3 stages, got "
                          f"{len(stages_raw) if isinstance(stages_raw, list) else type(stages_raw).__name__}")
    stages = [_run_spec(s, f"stages[{i}].", src, defaults, True) for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names) or "scratch" in names:
        raise ConfigError(f"{src}: stages[].name must be unique and not 'scratch', got {names}")
    for i, stage in enumerate(stages):
        for kind in KINDS:
            n = stage.tokens[kind]
            if n % tp:
                raise ConfigError(f"{src}: stages[{i}].tokens.{kind}={n} is not divisible by tp={tp}")
            if i and n < stages[i - 1].tokens[kind]:
                raise ConfigError(f"{src}: stages[{i}].tokens.{kind}={n} is smaller than stages[{i - 1}]'s "
                                  f"{stages[i - 1].tokens[kind]}; a ladder only grows")
        if i and stage.tokens == stages[i - 1].tokens:
            raise ConfigError(f"{src}: stages[{i}].tokens equal stages[{i - 1}]'s; every stage must grow")
    scratch = _run_spec(_req(raw, "scratch", "", src), "scratch.", src, defaults, False)
    scratch.tokens = dict(stages[-1].tokens)  # the largest model, from scratch
    budgets_raw = raw.get("budgets") or {"full": 1.0}
    if not isinstance(budgets_raw, dict) or "full" not in budgets_raw:
        raise ConfigError(f"{src}: budgets must be a mapping that includes 'full' (name: scale or {{scale, set}})")
    budgets = {}
    for name, b in budgets_raw.items():
        if not isinstance(b, dict):
            b = {"scale": b}
        _check_keys(b, ("scale", "set"), f"budgets.{name}.", src)
        scale = _num(_req(b, "scale", f"budgets.{name}.", src), f"budgets.{name}.scale", src)
        sets = b.get("set") or {}
        if not isinstance(sets, dict) or any(k in _RUN_KEYS for k in sets):
            raise ConfigError(f"{src}: budgets.{name}.set must map dotted trainer keys (not per-run keys) to values")
        budgets[str(name)] = {"scale": scale, "set": sets}
    return Ladder(src, trainer_config, dict(overrides), str(data.get("path", "data/progressive")), build, tp,
                  init, seed, eval_points, stages, scratch, budgets)


def _override_list(mapping: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def trainer_config(ladder: Ladder, run: RunSpec, budget: str, data: str, vocab: int, where: str) -> Config:
    """The full trainer config of one run (validated by tokenformer_dist.config), steps already scaled."""
    steps = scaled_steps(ladder, run, budget)
    sets = {**ladder.trainer_overrides, **ladder.budgets[budget]["set"],
            "model.vocab_size": vocab, "data.path": data, "train.steps": steps, "train.lr": run.lr,
            "train.min_lr": run.min_lr, "train.warmup_frac": run.warmup_frac, "train.seed": ladder.seed,
            "train.eval_every": max(1, steps // ladder.eval_points), "train.save_every": steps,
            "train.keep_last": 1, "model.qkv_tokens": run.tokens["qkv"],
            "model.proj_tokens": run.tokens["proj"], "model.ffn_tokens": run.tokens["ffn"]}
    try:
        return load_config(ladder.trainer_config, _override_list(sets), ladder.tp)
    except ConfigError as e:
        raise ConfigError(f"{ladder.source}: {where} (trainer_overrides / budgets.{budget}.set): {e}") from None


def scaled_steps(ladder: Ladder, run: RunSpec, budget: str) -> int:
    return max(2, round(run.steps * ladder.budgets[budget]["scale"]))


# ---------------------------------------------------------------------------------------- running the pieces
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # one BLAS thread per rank: TP ranks already occupy the cores
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "RAY_AUTH_MODE": "disabled"}


def _run_logged(cmd: list[str], log: Path, echo: re.Pattern | None = None, prefix: str = "") -> int:
    """Run cmd, its stdout+stderr to `log`; lines matching `echo` are printed with `prefix`."""
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if echo is not None and echo.search(line):
                print(f"{prefix}{line.strip()}", flush=True)
        return proc.wait()


def _fail(what: str, log: Path) -> None:
    tail = "\n".join(log.read_text().splitlines()[-25:]) if log.is_file() else ""
    print(f"{tail}\nerror: {what} failed; full log: {log}", file=sys.stderr)
    sys.exit(1)


def ensure_data(ladder: Ladder, data: Path) -> None:
    if (data / "manifest.json").is_file():
        return
    cmd = [sys.executable, str(REPO / "data_prep" / "build.py"), "--output", str(data), "--no-progress"]
    for key in ("sample_mb", "vocab_size", "tokenizer_sample_mb"):
        if key in ladder.data_build:
            value = ladder.data_build[key]
            cmd += [f"--{key.replace('_', '-')}", str(int(value) if key == "vocab_size" else value)]
    print(f"building the dataset {data} (data_prep/build.py, sample text already on this machine)...", flush=True)
    data.parent.mkdir(parents=True, exist_ok=True)
    log = data.parent / f".{data.name}.build.log"
    t0 = time.time()
    if _run_logged(cmd, log, re.compile(r"^built "), "  ") != 0:
        _fail(f"building the dataset {data}", log)
    log.unlink()
    print(f"  dataset built in {time.time() - t0:.0f} s", flush=True)


def dataset_vocab(data: Path, tp: int) -> int:
    try:
        vocab = int(json.loads((data / "manifest.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--data {data}: not a dataset built by data_prep/build.py ({e})") from None
    return -(-vocab // tp) * tp  # the embedding's rows are sharded over TP


def train_run(cfg: Config, run_dir: Path, tp: int, init_from: Path | None, label: str) -> float:
    """One torchrun launch of the trainer; returns its wall time."""
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_port",
           str(_free_port()), "-m", "tokenformer_dist.train", "--config", str(cfg_path), "--run-dir", str(run_dir)]
    if init_from is not None:
        cmd += ["--init-from", str(init_from)]
    t0 = time.time()
    if _run_logged(cmd, run_dir / "train.log", re.compile(r"val loss"), f"  [{label}] ") != 0:
        _fail(f"training {label}", run_dir / "train.log")
    return time.time() - t0


def expand(src_run: Path, dst: Path, tokens: dict[str, int], tp: int, init: str, seed: int, log: Path) -> float:
    spec = ",".join(f"{k}={tokens[k]}" for k in KINDS)
    cmd = [sys.executable, str(REPO / "tools" / "expand_tokens.py"), "--ckpt", str(src_run), "--out", str(dst),
           "--tp", str(tp), "--tokens", spec, "--init", init, "--seed", str(seed), "--no-progress"]
    t0 = time.time()
    if _run_logged(cmd, log) != 0:
        _fail(f"expanding {src_run} to {spec}", log)
    return time.time() - t0


# ------------------------------------------------------------------------------------------------- accounting
def run_record(name: str, cfg: Config, run_dir: Path, flops_before: float, wall_s: float) -> dict[str, Any]:
    """Eval curve and FLOPs of a finished run: FLOPs after step k = k · tokens/step · flops_per_token(model)."""
    m, t = cfg.model, cfg.train
    dp = 1  # one launch of `tp` processes: DP size = world / TP = 1
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * dp * m.seq_len
    fpt = flops_per_token(m)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train_rows = [r for r in rows if "loss" in r]
    if not train_rows or train_rows[-1]["step"] != t.steps or train_rows[-1]["tokens"] != t.steps * tokens_per_step:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: expected {t.steps} steps of {tokens_per_step} tokens")
    curve = [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
              "flops": flops_before + r["step"] * tokens_per_step * fpt,
              "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]} for r in rows if "val_loss" in r]
    if not curve or curve[-1]["step"] != t.steps:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: no validation record at the final step {t.steps}")
    flops = t.steps * tokens_per_step * fpt
    return {"name": name, "tokens": {"qkv": m.qkv_tokens, "proj": m.proj_tokens, "ffn": m.ffn_tokens},
            "params": param_count(m), "flops_per_token": fpt, "steps": t.steps, "tokens_per_step": tokens_per_step,
            "train_tokens": t.steps * tokens_per_step, "lr": t.lr, "min_lr": t.min_lr, "warmup_frac": t.warmup_frac,
            "flops": flops, "cum_flops_start": flops_before, "cum_flops_end": flops_before + flops,
            "final_val_loss": curve[-1]["val_loss"], "final_val_ppl": curve[-1]["val_ppl"],
            "final_train_loss": train_rows[-1]["loss"], "wall_s": round(wall_s, 1), "curve": curve}


def flops_to_reach(curve: list[dict[str, Any]], target: float) -> float | None:
    """FLOPs where `curve` (in order) first reaches val_loss <= target, linear in FLOPs between eval points."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None or prev["val_loss"] == point["val_loss"]:
                return point["flops"]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev["flops"] + frac * (point["flops"] - prev["flops"])
        prev = point
    return None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt_tokens(t: dict[str, int]) -> str:
    return f"{t['qkv']}/{t['proj']}/{t['ffn']}"


def results_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    ratio = res["compute_ratio"]
    lines = [
        f"# Progressive scaling in miniature (budget `{s['budget']}`)", "",
        f"Dataset `{s['data']}` (vocab {s['vocab_size']}), d={s['d_model']}, layers={s['n_layers']}, "
        f"seq={s['seq_len']}, TP {s['tp']}, init `{s['init']}`, seed {s['seed']}. Training FLOPs = 3 × forward "
        "(metrics.flops_per_token); expansions cost no training FLOPs.", "",
        "| run | tokens qkv/proj/ffn | params | steps | train tokens | FLOPs | cumulative FLOPs | "
        "final val loss | val ppl | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [res["scratch"], *res["progressive"]["stages"]]:
        label = "scratch (largest)" if r is res["scratch"] else f"ladder: {r['name']}"
        lines.append(f"| {label} | {_fmt_tokens(r['tokens'])} | {r['params']:,} | {r['steps']} | "
                     f"{r['train_tokens']:,} | {r['flops']:.3g} | {r['cum_flops_end']:.3g} | "
                     f"{r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | {r['wall_s']:.0f} |")
    reach = res["progressive"]["flops_to_target"]
    lines += ["", f"Target (scratch final val loss): **{res['target_val_loss']:.4f}** at "
              f"{res['scratch']['flops']:.3g} FLOPs.",
              f"Ladder reaches it at: **{f'{reach:.3g} FLOPs' if reach is not None else 'never'}**; "
              f"ladder total {res['progressive']['flops']:.3g} FLOPs, final val loss "
              f"{res['progressive']['final_val_loss']:.4f}.",
              f"**compute_ratio = {f'{ratio:.3f}' if ratio is not None else 'null'}** (paper: ≈0.34; goal ≤ 0.5). "
              f"Wall time {res['wall_s']['total']:.0f} s.", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = res["scratch"]["curve"]
    ax.plot([p["flops"] for p in sc], [p["val_ppl"] for p in sc], "o-", color="tab:gray", ms=3,
            label=f"from scratch ({_fmt_tokens(res['scratch']['tokens'])} tokens)")
    pc = res["progressive"]["curve"]
    ax.plot([p["flops"] for p in pc], [p["val_ppl"] for p in pc], "o-", color="tab:blue", ms=3,
            label="TokenFormer ladder " + " → ".join(_fmt_tokens(s["tokens"]) for s in res["progressive"]["stages"]))
    for st in res["progressive"]["stages"][:-1]:
        ax.axvline(st["cum_flops_end"], color="tab:blue", ls=":", lw=0.8)
    for st in res["progressive"]["stages"]:  # label each stage's span at the top of the axes
        first = [p for p in pc if p["stage"] == st["name"]][0]["flops"]
        x = math.sqrt(max(st["cum_flops_start"], first) * st["cum_flops_end"])
        ax.text(x, 0.97, st["name"], transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="tab:blue")
    ax.axhline(math.exp(res["target_val_loss"]), color="tab:gray", ls="--", lw=0.8)
    reach = res["progressive"]["flops_to_target"]
    if reach is not None:
        ax.axvline(reach, color="tab:green", ls="--", lw=0.8)
        ax.annotate(f"ratio {res['compute_ratio']:.2f}", (reach, math.exp(res["target_val_loss"])),
                    textcoords="offset points", xytext=(4, -14), fontsize=8, color="tab:green")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"Progressive scaling in miniature (budget {res['settings']['budget']})")
    lo = min(p["val_ppl"] for p in sc + pc)
    ax.set_ylim(lo * 0.95, min(max(p["val_ppl"] for p in sc + pc), lo * 3) * 1.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------- main
def _hms(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="ladder config (configs/progressive_mini.yaml)")
    parser.add_argument("--data", default=None, help="built dataset dir (default: the ladder's data.path; "
                                                     "built with data_prep/build.py's sample mode if missing)")
    parser.add_argument("--out", default="runs/progressive", help="output dir (default runs/progressive)")
    parser.add_argument("--budget", default="full", help="a budget of the ladder config (small, full, ...)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --out first")
    args = parser.parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    try:
        ladder = load_ladder(args.config)
        if args.budget not in ladder.budgets:
            raise ConfigError(f"--budget {args.budget!r}: valid budgets of {ladder.source}: "
                              f"{', '.join(ladder.budgets)}")
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise ConfigError(f"--out {out}: exists and is not empty; pass --overwrite or choose another --out")
        data = Path(args.data or ladder.data_path)
        if not data.is_absolute():
            data = (Path.cwd() / data) if args.data else (REPO / data)
        if data.exists() and not (data / "manifest.json").is_file():
            raise ConfigError(f"--data {data}: exists but has no manifest.json (not a built dataset)")
        # validate every run's trainer config before the (slow) dataset build
        vocab = dataset_vocab(data, ladder.tp) if data.exists() else int(ladder.data_build.get("vocab_size", 8192))
        runs = [ladder.scratch, *ladder.stages]
        for i, run in enumerate(runs):
            trainer_config(ladder, run, args.budget, str(data), -(-vocab // ladder.tp) * ladder.tp,
                           "scratch" if i == 0 else f"stages[{i - 1}]")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    ensure_data(ladder, data)
    vocab = dataset_vocab(data, ladder.tp)
    cfgs = [trainer_config(ladder, run, args.budget, str(data), vocab, run.name) for run in runs]
    planned = [c.train.steps * c.train.micro_batch_size * c.train.grad_accum_steps * c.model.seq_len *
               flops_per_token(c.model) for c in cfgs]
    print(f"progressive experiment, budget {args.budget!r}: scratch {_fmt_tokens(ladder.scratch.tokens)} "
          f"({cfgs[0].train.steps} steps) vs ladder " +
          " → ".join(f"{s.name} {_fmt_tokens(s.tokens)} ({c.train.steps} steps)"
                     for s, c in zip(ladder.stages, cfgs[1:], strict=True)) +
          f"; planned FLOPs: scratch {planned[0]:.3g}, ladder {sum(planned[1:]):.3g} "
          f"({sum(planned[1:]) / planned[0]:.2f}×)", flush=True)

    done_flops, train_wall = 0.0, 0.0
    records: list[dict[str, Any]] = []
    cum, prev_run = 0.0, None
    for i, (run, cfg) in enumerate(zip(runs, cfgs, strict=True)):
        label = "scratch" if i == 0 else f"stage {i}/{len(ladder.stages)} {run.name}"
        init_from, expand_s = None, 0.0
        if i >= 2:  # grow the previous stage's trained weights to this stage's token counts
            init_from = out / "expanded" / run.name
            init_from.parent.mkdir(exist_ok=True)
            expand_s = expand(prev_run, init_from, run.tokens, ladder.tp, ladder.init, ladder.seed + i,
                              out / "expanded" / f"{run.name}.log")
            print(f"  [{label}] expanded {ladder.stages[i - 2].name} → {_fmt_tokens(run.tokens)} "
                  f"(init {ladder.init}, {expand_s:.0f} s, no training FLOPs)", flush=True)
        run_dir = out / ("scratch" if i == 0 else f"stage{i}_{run.name}")
        wall = train_run(cfg, run_dir, ladder.tp, init_from, label)
        before = 0.0 if i == 0 else cum
        rec = run_record(run.name, cfg, run_dir, before, wall)
        rec["expand_s"] = round(expand_s, 1)
        records.append(rec)
        if i >= 1:
            cum = rec["cum_flops_end"]
        prev_run = run_dir
        done_flops += planned[i]
        train_wall += wall + expand_s
        eta = train_wall / done_flops * sum(planned[i + 1:]) if i + 1 < len(runs) else 0.0
        print(f"[{label}] {rec['steps']} steps, {rec['train_tokens']:,} tokens, "
              f"{'FLOPs' if i == 0 else 'cumulative ladder FLOPs'} {rec['cum_flops_end']:.3g}, "
              f"val loss {rec['final_val_loss']:.4f} (ppl {rec['final_val_ppl']:.2f}), {wall:.0f} s; "
              f"elapsed {_hms(time.time() - t_start)}, ETA {_hms(eta)}", flush=True)

    scratch, stages = records[0], records[1:]
    target = scratch["final_val_loss"]
    curve = [{"stage": st["name"], **p} for st in stages for p in st["curve"]]
    reach = flops_to_reach(curve, target)
    ladder_flops = stages[-1]["cum_flops_end"]
    res: dict[str, Any] = {
        "compute_ratio": reach / scratch["flops"] if reach is not None else None,
        "target_val_loss": target,
        "total_flops_ratio": ladder_flops / scratch["flops"],
        "scratch": scratch,
        "progressive": {"stages": stages, "flops": ladder_flops, "flops_to_target": reach,
                        "final_val_loss": stages[-1]["final_val_loss"], "curve": curve},
        "expansion_flops": 0.0,
        "settings": {"budget": args.budget, "scale": ladder.budgets[args.budget]["scale"],
                     "ladder_config": ladder.source, "data": str(data), "vocab_size": vocab,
                     "d_model": cfgs[0].model.d_model, "n_layers": cfgs[0].model.n_layers,
                     "n_heads": cfgs[0].model.n_heads, "seq_len": cfgs[0].model.seq_len,
                     "micro_batch_size": cfgs[0].train.micro_batch_size, "tp": ladder.tp, "init": ladder.init,
                     "seed": ladder.seed, "eval_batches": cfgs[0].train.eval_batches,
                     "flops_convention": "training = 3 x forward, metrics.flops_per_token"},
        "wall_s": {"total": round(time.time() - t_start, 1), "scratch": scratch["wall_s"],
                   "ladder": round(sum(s["wall_s"] + s["expand_s"] for s in stages), 1)},
    }
    plot(res, out / "progressive.png")
    write_atomic(out / "results.md", results_markdown(res))
    write_atomic(out / "results.json", json.dumps(res, indent=1) + "\n")  # last: its presence means complete
    ratio = res["compute_ratio"]
    print(f"compute_ratio = {f'{ratio:.3f}' if ratio is not None else 'null (target never reached)'}: scratch "
          f"final val loss {target:.4f} at {scratch['flops']:.3g} FLOPs; ladder final "
          f"{stages[-1]['final_val_loss']:.4f} at {ladder_flops:.3g} FLOPs; {_hms(time.time() - t_start)} total. "
          f"Wrote {out}/results.json, results.md, progressive.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
