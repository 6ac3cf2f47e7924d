"""Plan, run and collect the progressive-scaling experiment: for every seed, four arms on the same data —
`scratch` (the last stage's model from scratch), `no_growth` (stage 1 trained on for the rest of the ladders'
compute), `grow_exact` and `grow_official` (the ladder, grown with tools/expand_tokens.py --init exact|official).
Stage 1 is trained once per seed and shared by the three arms that start from it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenformer_dist.atomic import atomic_write_text
from tokenformer_dist.checkpoint import engine as ckpt_lib
from tokenformer_dist.config import Config, ConfigError, param_count
from tokenformer_dist.progressive import accounting as acc
from tokenformer_dist.progressive.ladder import GROW_ARMS, Ladder, resolve, run_overrides, scaled_steps, set_args
from tokenformer_dist.progressive.runner import Job, expand, run_jobs, say, train


@dataclass
class Run:
    """One trainer launch of the plan."""

    key: str           # unique job name, e.g. "seed2/grow_exact/s3"
    seed: int
    arm: str           # scratch | stage1 (shared) | no_growth | grow_exact | grow_official
    stage: str         # stage name ("scratch", "no_growth" for the control's continuation)
    stage_index: int
    run_dir: Path
    cfg: Config
    overrides: dict[str, Any]
    init_from: Path | None = None
    grow_from: Path | None = None  # for a grown stage: the run whose weights tools/expand_tokens.py grows
    init: str | None = None        # exact | official
    wall_s: float = 0.0
    expand_s: float = 0.0
    reused: bool = False  # --resume found it finished: neither grown nor trained again

    @property
    def flops(self) -> float:
        return acc.run_flops(self.cfg)


def plan(ladder: Ladder, budget: str, out: Path, data: str, vocab: int) -> list[Run]:
    """Every run of the experiment with its resolved trainer config (validated; nothing is launched)."""
    runs: list[Run] = []

    def add(key: str, seed: int, arm: str, stage: str, idx: int, tokens: dict[str, int], steps: int, sched,
            where: str, **kw: Any) -> Run:
        ov = run_overrides(ladder, tokens, steps, sched, budget, data, vocab, seed, idx)
        run = Run(key, seed, arm, stage, idx, out / key, resolve(ladder, ov, where), ov, **kw)
        runs.append(run)
        return run

    for seed in ladder.seeds(budget):
        sd = f"seed{seed}"
        sc = ladder.scratch
        add(f"{sd}/scratch", seed, "scratch", "scratch", 0, sc.tokens, scaled_steps(ladder, sc.steps, budget), sc.sched,
            "scratch")
        s1 = ladder.stages[0]
        first = add(f"{sd}/{s1.name}", seed, "stage1", s1.name, 0, s1.tokens, scaled_steps(ladder, s1.steps, budget),
                    s1.sched, "stages[0]")
        later_flops = 0.0
        for arm in GROW_ARMS:
            prev = first
            for i, st in enumerate(ladder.stages[1:], start=1):
                grown = out / sd / arm / f"expanded_{st.name}"
                prev = add(f"{sd}/{arm}/{st.name}", seed, arm, st.name, i, st.tokens,
                           scaled_steps(ladder, st.steps, budget), st.sched, f"stages[{i}]", init_from=grown,
                           grow_from=prev.run_dir, init=arm.removeprefix("grow_"))
                if arm == GROW_ARMS[0]:
                    later_flops += prev.flops
        # the control: the stage-1 model, fresh schedule, for at least the ladders' post-stage-1 FLOPs
        steps = max(2, math.ceil(later_flops / acc.flops_per_step(first.cfg) - 1e-9))
        add(f"{sd}/no_growth", seed, "no_growth", "no_growth", 1, s1.tokens, steps, ladder.no_growth, "no_growth",
            init_from=first.run_dir)
    return runs


WALL_FILE = "experiment_wall.json"  # a finished run's wall times, so that a resumed experiment still reports them


def finished(r: Run) -> bool:
    """For --resume: whether r.run_dir's latest checkpoint is this run's final step. A checkpoint of another
    config than the planned one raises ConfigError naming the first differing key (an earlier step of the same
    config is not finished: the trainer resumes there)."""
    if ckpt_lib.latest_tag(r.run_dir) is None:
        return False
    ckpt = ckpt_lib.resolve_checkpoint(r.run_dir)
    have, want = ckpt_lib.read_config(ckpt).to_dict(), r.cfg.to_dict()
    for section, values in want.items():
        for key, value in values.items():
            if have.get(section, {}).get(key) != value:
                raise ConfigError(f"--resume: {r.run_dir} was trained with {section}.{key}="
                                  f"{have.get(section, {}).get(key)!r}, this plan has {value!r}; the same --config "
                                  "and --budget are needed, or another --out")
    return ckpt_lib.read_meta(ckpt)["step"] == r.cfg.train.steps


def mark_reused(runs: list[Run]) -> int:
    """--resume: mark the runs already finished (their wall times read back); the number marked."""
    for r in runs:
        if finished(r):
            r.reused = True
            wall = r.run_dir / WALL_FILE
            if wall.is_file():
                times = json.loads(wall.read_text())
                r.wall_s, r.expand_s = times["wall_s"], times["expand_s"]
    return sum(r.reused for r in runs)


def execute(runs: list[Run], ladder: Ladder, resume: bool = False) -> None:
    """Launch every run (and the growth before it) through the tools' CLIs, `ladder.jobs` at a time. With
    `resume`, runs marked reused are skipped, a run with an earlier checkpoint continues from it (the trainer
    resumes a run dir) and a growth whose output exists is not redone (the tool writes it atomically)."""
    by_dir = {r.run_dir: r for r in runs}
    total = sum(r.flops for r in runs if not r.reused)  # progress and ETA count what this invocation runs

    def job(r: Run) -> Job:
        def fn() -> None:
            if r.reused:
                return
            if r.grow_from is not None and not (resume and r.init_from is not None and r.init_from.is_dir()):
                assert r.init_from is not None and r.init is not None
                r.expand_s = expand(r.grow_from, r.init_from, _tokens(r.cfg), ladder.tp, r.init,
                                    r.seed * 100 + r.stage_index, r.init_from.with_suffix(".log"))
            r.wall_s = train(ladder.trainer_config, set_args(r.overrides), r.run_dir, ladder.tp, r.init_from, r.key,
                             resume=resume)
            atomic_write_text(r.run_dir / WALL_FILE, json.dumps({"wall_s": r.wall_s, "expand_s": r.expand_s}) + "\n")
        src = r.grow_from or r.init_from
        deps = [by_dir[src].key] if src is not None else []
        return Job(r.key, fn, deps, 0.0 if r.reused else r.flops)

    def progress(j: Job, done: float, elapsed: float) -> None:
        r = next(r for r in runs if r.key == j.name)
        curve, _ = acc.read_curve(r.run_dir, r.cfg)
        eta = _hms(elapsed / done * (total - done)) if done else "?" if total else "0:00"
        share = f"{done / total:.0%}" if total else "100%"
        took = "finished before (--resume)" if r.reused else f"{r.wall_s:.0f} s" + (
            f" (+{r.expand_s:.0f} s growth)" if r.grow_from else "")
        say(f"[{r.key}] {r.cfg.train.steps} steps, val loss {curve[-1]['val_loss']:.4f}, {took}; "
            f"{share} of the FLOPs to run done, "
            f"elapsed {_hms(elapsed)}, ETA {eta}")

    run_jobs([job(r) for r in runs], ladder.jobs, progress)


def _hms(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _tokens(cfg: Config) -> dict[str, int]:
    return {"qkv": cfg.model.qkv_tokens, "proj": cfg.model.proj_tokens, "ffn": cfg.model.ffn_tokens}



def run_record(r: Run) -> dict[str, Any]:
    return {"run": r.key, "arm": r.arm, "stage": r.stage, "tokens": _tokens(r.cfg), "params": param_count(r.cfg.model),
            "flops_per_token": acc.flops_per_step(r.cfg) / acc.tokens_per_step(r.cfg), "steps": r.cfg.train.steps,
            "train_tokens": r.cfg.train.steps * acc.tokens_per_step(r.cfg), "flops": r.flops, "lr": r.cfg.train.lr,
            "min_lr": r.cfg.train.min_lr, "warmup_frac": r.cfg.train.warmup_frac, "data_seed": r.cfg.data.seed,
            "init": r.init, "wall_s": round(r.wall_s, 1), "expand_s": round(r.expand_s, 1), "reused": r.reused}


def collect(runs: list[Run], ladder: Ladder, budget: str) -> dict[str, Any]:
    """Curves of every arm and seed (cumulative FLOPs), and the matched-compute comparisons."""
    seeds = ladder.seeds(budget)
    arms: dict[str, dict[str, Any]] = {a: {"flops": None, "final_val_loss": [], "curves": []}
                                       for a in ("scratch", "no_growth", *GROW_ARMS)}
    for a in GROW_ARMS:
        arms[a]["post_growth_bump"] = []
    regime_pairs, ratios, gains, gains_off, exact_vs_off = [], [], [], [], []
    over_scratch: dict[str, list[float | None]] = {a: [] for a in ("no_growth", *GROW_ARMS)}
    growth_flops: list[float] = []
    for seed in seeds:
        mine = {(r.arm, r.stage): r for r in runs if r.seed == seed}
        scratch = mine[("scratch", "scratch")]
        sc_curve, _ = acc.read_curve(scratch.run_dir, scratch.cfg)
        s1 = mine[("stage1", ladder.stages[0].name)]
        s1_curve, _ = acc.read_curve(s1.run_dir, s1.cfg)
        s1_curve = [{**p, "stage": s1.stage} for p in s1_curve]
        # same steps and tokens/step as scratch (checked by load_ladder), same data order: same tokens
        assert s1.cfg.train.steps * acc.tokens_per_step(s1.cfg) == scratch.cfg.train.steps * acc.tokens_per_step(
            scratch.cfg)
        regime_pairs.append((sc_curve[-1]["val_loss"], s1_curve[-1]["val_loss"]))
        curves: dict[str, acc.Curve] = {"scratch": [{**p, "stage": "scratch"} for p in sc_curve]}
        ng = mine[("no_growth", "no_growth")]
        ng_curve, _ = acc.read_curve(ng.run_dir, ng.cfg, s1.flops)
        curves["no_growth"] = s1_curve + [{**p, "stage": "no_growth"} for p in ng_curve]
        for a in GROW_ARMS:
            stage_curves, cum = [s1_curve], s1.flops
            growth_at = []
            for st in ladder.stages[1:]:
                r = mine[(a, st.name)]
                growth_at.append(cum)
                c, _ = acc.read_curve(r.run_dir, r.cfg, cum)
                stage_curves.append([{**p, "stage": st.name} for p in c])
                cum += r.flops
            curves[a] = [p for c in stage_curves for p in c]
            arms[a]["post_growth_bump"].append(acc.post_growth_bumps(stage_curves))
            growth_flops = growth_at
        for a, c in curves.items():
            arms[a]["final_val_loss"].append(c[-1]["val_loss"])
            arms[a]["curves"].append({"seed": seed, "points": c})
            arms[a]["flops"] = c[-1]["flops"]
        ratios.append(acc.compute_ratio(curves["grow_exact"], curves["scratch"]))
        gains.append(acc.matched_gain(curves["no_growth"], curves["grow_exact"]))
        gains_off.append(acc.matched_gain(curves["no_growth"], curves["grow_official"]))
        exact_vs_off.append(curves["grow_official"][-1]["val_loss"] - curves["grow_exact"][-1]["val_loss"])
        for a, per_seed in over_scratch.items():
            per_seed.append(acc.matched_gain_or_none(curves["scratch"], curves[a]))
    sc_mean = sum(p[0] for p in regime_pairs) / len(regime_pairs)
    small_mean = sum(p[1] for p in regime_pairs) / len(regime_pairs)
    regime = {"scratch_final": sc_mean, "small_same_tokens_final": small_mean,
              "ok": all(sc < small for sc, small in regime_pairs),
              "per_seed": [{"seed": s, "scratch_final": a, "small_same_tokens_final": b}
                           for s, (a, b) in zip(seeds, regime_pairs, strict=True)],
              "rule": "ok = scratch's final val loss < stage 1's final val loss (same tokens, same data order) "
                      "for every seed"}
    return {"seeds": seeds, "regime": regime, "arms": arms,
            "growth_gain": {**acc.mean_ci95(gains), "per_seed": gains},
            "growth_gain_official": {**acc.mean_ci95(gains_off), "per_seed": gains_off},
            "exact_vs_official": {**acc.mean_ci95(exact_vs_off), "per_seed": exact_vs_off},
            "compute_ratio": acc.aggregate_or_null(ratios), "compute_ratio_per_seed": ratios,
            # scratch's val loss where its curve reaches the arm's final FLOPs − the arm's final (> 0: the arm is
            # better at equal compute); null where scratch spent less. Scratch is mid-schedule there (its LR not
            # yet decayed), which favours the arm.
            "gain_over_scratch": {a: acc.aggregate_or_null(v) for a, v in over_scratch.items()},
            "growth_flops": growth_flops}
