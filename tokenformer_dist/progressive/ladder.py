"""The ladder config of the progressive-scaling experiment (configs/progressive_*.yaml) and the trainer
settings of every run it implies. Not a trainer config: each run's trainer settings are trainer_config +
trainer_overrides + the budget's `set` + the run's token counts, steps, LR schedule and seeds, passed to
`tokenformer_dist.train` as `--config` plus `--set` overrides."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenformer_dist.config import Config, ConfigError, load_config, read_yaml
from tokenformer_dist.growth.tokens import KINDS

REPO = Path(__file__).resolve().parents[2]
GROW_ARMS = ("grow_exact", "grow_official")  # ladders; `init` of tools/expand_tokens.py is the suffix
ARMS = ("scratch", "no_growth", *GROW_ARMS)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# trainer keys the ladder sets per run; setting them in trainer_overrides would be silently overridden
RUN_KEYS = {"train.steps", "train.lr", "train.min_lr", "train.warmup_frac", "train.eval_every", "parallel.tp",
            "model.qkv_tokens", "model.proj_tokens", "model.ffn_tokens", "data.path", "model.vocab_size",
            "train.seed", "data.seed", "train.save_every", "train.keep_last"}
_TOP = ("trainer_config", "trainer_overrides", "data", "tp", "seed", "eval_points", "lr", "min_lr", "warmup_frac",
        "stages", "scratch", "no_growth", "budgets", "jobs")


@dataclass
class Schedule:
    lr: float
    min_lr: float
    warmup_frac: float


@dataclass
class RunSpec:
    """One training run of the ladder: a stage, or the from-scratch run (the last stage's model)."""

    name: str
    tokens: dict[str, int]
    steps: int
    sched: Schedule


@dataclass
class Budget:
    scale: float  # every run's steps × scale
    seeds: int    # independent repeats (init and data order)
    set: dict[str, Any]  # extra trainer keys (fewer eval batches, shorter sequences)


@dataclass
class Ladder:
    source: str
    trainer_config: Path
    trainer_overrides: dict[str, Any]
    data_path: str
    data_build: dict[str, float]
    tp: int
    seed: int
    eval_points: int
    stages: list[RunSpec]
    scratch: RunSpec
    no_growth: Schedule  # the stage-1 model trained on for the rest of the ladder's compute
    budgets: dict[str, Budget]
    jobs: int  # trainer launches run at once (each uses `tp` processes)

    def seeds(self, budget: str) -> list[int]:
        return [self.seed + k for k in range(self.budgets[budget].seeds)]


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


def _schedule(raw: dict, where: str, src: str, defaults: Schedule) -> Schedule:
    lr = _num(raw.get("lr", defaults.lr), f"{where}lr", src)
    min_lr = _num(raw.get("min_lr", defaults.min_lr), f"{where}min_lr", src, positive=False)
    warmup = _num(raw.get("warmup_frac", defaults.warmup_frac), f"{where}warmup_frac", src, positive=False)
    if min_lr > lr:
        raise ConfigError(f"{src}: {where}min_lr={min_lr} must be <= {where}lr={lr}")
    if warmup >= 1:
        raise ConfigError(f"{src}: {where}warmup_frac must be in [0, 1), got {warmup}")
    return Schedule(lr, min_lr, warmup)


def _run_spec(raw: Any, where: str, src: str, defaults: Schedule, with_tokens: bool) -> RunSpec:
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
    sched = _schedule(raw, where, src, defaults)
    steps = _num(_req(raw, "steps", where, src), f"{where}steps", src, int)
    return RunSpec(name, tokens, steps, sched)


def load_ladder(path: str | Path) -> Ladder:
    """Read and validate a ladder config; ConfigError (one line, naming the file and key) on bad input."""
    src = str(path)
    raw = _check_keys(read_yaml(path, "ladder config"), _TOP, "", src)
    trainer_config = Path(str(_req(raw, "trainer_config", "", src)))
    if not trainer_config.is_absolute():
        trainer_config = REPO / trainer_config
    if not trainer_config.is_file():
        raise ConfigError(f"{src}: trainer_config {raw['trainer_config']!r}: no such file")
    overrides = raw.get("trainer_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{src}: trainer_overrides must be a mapping of dotted trainer keys to values")
    for key in overrides:
        if key in RUN_KEYS:
            raise ConfigError(f"{src}: trainer_overrides.{key} is set per run by the ladder (stages/scratch/data/tp)")
    data = _check_keys(raw.get("data") or {}, ("path", "sample_mb", "vocab_size", "tokenizer_sample_mb"),
                       "data.", src)
    build = {k: _num(data[k], f"data.{k}", src) for k in ("sample_mb", "vocab_size", "tokenizer_sample_mb")
             if k in data}
    tp = _num(raw.get("tp", 1), "tp", src, int)
    seed = _num(raw.get("seed", 1), "seed", src, int, positive=False)
    eval_points = _num(raw.get("eval_points", 10), "eval_points", src, int)
    jobs = _num(raw.get("jobs", 1), "jobs", src, int)
    defaults = _schedule(raw, "", src, Schedule(3e-3, 3e-4, 0.02))
    stages_raw = _req(raw, "stages", "", src)
    if not isinstance(stages_raw, list) or len(stages_raw) < 2:
        raise ConfigError(f"{src}: stages must be a list of at least 2 stages, got "
                          f"{len(stages_raw) if isinstance(stages_raw, list) else type(stages_raw).__name__}")
    stages = [_run_spec(s, f"stages[{i}].", src, defaults, True) for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names) or set(names) & {"scratch", "no_growth"}:
        raise ConfigError(f"{src}: stages[].name must be unique and not 'scratch' or 'no_growth', got {names}")
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
    if stages[0].steps != scratch.steps:  # every run shares tokens/step, so equal steps = equal tokens
        raise ConfigError(f"{src}: stages[0].steps={stages[0].steps} must equal scratch.steps={scratch.steps}: "
                          "the regime check compares stage 1 and scratch on the same tokens")
    no_growth = _schedule(_check_keys(raw.get("no_growth") or {}, ("lr", "min_lr", "warmup_frac"), "no_growth.",
                                      src), "no_growth.", src, stages[1].sched)
    budgets_raw = raw.get("budgets") or {"full": 1.0}
    if not isinstance(budgets_raw, dict) or "full" not in budgets_raw:
        raise ConfigError(f"{src}: budgets must be a mapping that includes 'full' "
                          "(name: scale or {scale, seeds, set})")
    budgets = {}
    for name, b in budgets_raw.items():
        if not isinstance(b, dict):
            b = {"scale": b}
        _check_keys(b, ("scale", "seeds", "set"), f"budgets.{name}.", src)
        scale = _num(_req(b, "scale", f"budgets.{name}.", src), f"budgets.{name}.scale", src)
        seeds = _num(b.get("seeds", 1), f"budgets.{name}.seeds", src, int)
        sets = b.get("set") or {}
        if not isinstance(sets, dict) or any(k in RUN_KEYS for k in sets):
            raise ConfigError(f"{src}: budgets.{name}.set must map dotted trainer keys (not per-run keys) to values")
        budgets[str(name)] = Budget(scale, seeds, sets)
    return Ladder(src, trainer_config, dict(overrides), str(data.get("path", "data/progressive")), build, tp,
                  seed, eval_points, stages, scratch, no_growth, budgets, jobs)


def scaled_steps(ladder: Ladder, steps: int, budget: str) -> int:
    return max(2, round(steps * ladder.budgets[budget].scale))


def data_seed(seed: int, stage_index: int) -> int:
    """Data-order seed of the runs that train stage `stage_index` (0-based). scratch uses stage 0's, so it and
    stage 1 see the very same windows (the regime check); no_growth uses stage 1's, as the ladders' stage 2."""
    return seed * 100 + stage_index


def run_overrides(ladder: Ladder, tokens: dict[str, int], steps: int, sched: Schedule, budget: str, data: str,
                  vocab: int, seed: int, stage_index: int) -> dict[str, Any]:
    """The trainer keys of one run (passed as `--set k=v`, after trainer_overrides and the budget's set)."""
    return {**ladder.trainer_overrides, **ladder.budgets[budget].set,
            "model.vocab_size": vocab, "data.path": data, "train.steps": steps, "train.lr": sched.lr,
            "train.min_lr": sched.min_lr, "train.warmup_frac": sched.warmup_frac, "train.seed": seed,
            "data.seed": data_seed(seed, stage_index),
            "train.eval_every": max(1, math.ceil(steps / ladder.eval_points)),
            "train.save_every": steps, "train.keep_last": 1, "model.qkv_tokens": tokens["qkv"],
            "model.proj_tokens": tokens["proj"], "model.ffn_tokens": tokens["ffn"]}


def set_args(overrides: dict[str, Any]) -> list[str]:
    """`k=v` strings for the trainer's repeatable --set (JSON values: the config parser reads them as YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def resolve(ladder: Ladder, overrides: dict[str, Any], where: str) -> Config:
    """The validated trainer config the trainer will build from the same --config/--set/--tp."""
    try:
        return load_config(ladder.trainer_config, set_args(overrides), ladder.tp)
    except ConfigError as e:
        raise ConfigError(f"{ladder.source}: {where} (trainer_overrides / budgets.*.set): {e}") from None
