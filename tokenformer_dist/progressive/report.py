"""What the progressive-scaling experiment reports: the one-line headline, results.md and progressive.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tokenformer_dist.atomic import atomic_path
from tokenformer_dist.progressive.accounting import mean_curve

ARM_STYLE = {"scratch": ("tab:gray", "scratch (last stage's model from scratch)"),
             "no_growth": ("tab:orange", "no_growth (stage 1 trained on: the control)"),
             "grow_exact": ("tab:blue", "grow_exact (function-preserving growth)"),
             "grow_official": ("tab:green", "grow_official (official recipe: random keys, τ=√n_new)")}


def _ci(stat: dict[str, Any], fmt: str = "+.3f") -> str:
    if stat.get("ci95") is None:
        return f"{stat['mean']:{fmt}} (1 seed, no interval)"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:{fmt}} (95% CI {lo:{fmt}} to {hi:{fmt}}, {stat['n']} seeds)"


def _verdict(stat: dict[str, Any]) -> int:
    """+1: interval above 0; -1: below 0; 0: includes 0 (or one seed and mean == 0)."""
    lo, hi = stat["ci95"] if stat.get("ci95") is not None else (stat["mean"], stat["mean"])
    return 1 if lo > 0 else -1 if hi < 0 else 0


def headline(res: dict[str, Any]) -> str:
    """One plain sentence (per clause) of what the data says, for the CLI's last line and results.md."""
    reg, gain = res["regime"], res["growth_gain"]
    parts = []
    if not reg["ok"]:
        parts.append(f"REGIME CHECK FAILED: at scratch's budget the stage-1 model on the same tokens "
                     f"({reg['small_same_tokens_final']:.3f}) was not beaten by scratch ({reg['scratch_final']:.3f}) "
                     "in every seed, so bigger is not better here and growth cannot be judged")
    else:
        parts.append(f"regime ok (scratch {reg['scratch_final']:.3f} < stage 1 {reg['small_same_tokens_final']:.3f} "
                     "on the same tokens)")
    v = _verdict(gain)
    if gain.get("ci95") is None:
        parts.append(f"growth_gain {gain['mean']:+.3f} on one seed (no interval: not a finding)")
    elif v > 0:
        parts.append(f"growth beat the control: at equal compute grow_exact is {gain['mean']:.3f} nats below "
                     f"no_growth, gain {_ci(gain)}")
    elif v < 0:
        parts.append(f"growth did not beat the control: at equal compute grow_exact is {-gain['mean']:.3f} nats "
                     f"ABOVE no_growth, gain {_ci(gain)}")
    else:
        parts.append(f"growth did not beat the control measurably: gain {_ci(gain)} includes 0")
    ex = res["exact_vs_official"]
    ve = _verdict(ex) if ex.get("ci95") is not None else 0
    parts.append(("lossless growth beat the official recipe" if ve > 0 else "the official recipe beat lossless growth"
                  if ve < 0 else "lossless vs official growth: no measurable difference") +
                 f" (official − exact final val loss {_ci(ex)})")
    vs = res["gain_over_scratch"]["grow_exact"]
    if vs is not None:
        v = _verdict(vs)
        parts.append("at the ladder's final compute " + (
            f"grow_exact was {vs['mean']:.3f} nats below scratch" if v > 0 else
            f"scratch was {-vs['mean']:.3f} nats below grow_exact" if v < 0 else
            "grow_exact and scratch did not differ measurably") + f" (gain over scratch {_ci(vs)})")
    cr = res["compute_ratio"]
    if cr is None:
        never = sum(x is None for x in res["compute_ratio_per_seed"])
        parts.append(f"compute_ratio null: the grown ladder never reached scratch's final val loss "
                     f"({never}/{len(res['seeds'])} seeds)")
    else:
        parts.append(f"compute_ratio {_ci(cr, '.2f')} of scratch's FLOPs to reach its final val loss")
    return "; ".join(parts) + "."


def _fmt_tokens(t: dict[str, int]) -> str:
    return f"{t['qkv']}/{t['proj']}/{t['ffn']}"


def dataset_prose(d: dict[str, Any], model_vocab: int) -> str:
    """The dataset named by what it is (settings.dataset: its manifest's facts), never by where it lay."""
    what = ("the sample corpus of data_prep/build.py (docstrings and documentation of the installed Python "
            "packages)" if d["sample"] else " + ".join(d["inputs"]))
    if d.get("text_bytes"):
        mb = d["text_bytes"] / (1 << 20)  # data_prep's MB, as in --sample-mb
        what += f", {mb:,.0f} MB of text" if mb >= 10 else f", {mb:.1f} MB of text"
    tok = f"sentencepiece {d['tokenizer']} tokenizer trained on it" if d["tokenizer"] else \
        "a given sentencepiece tokenizer"
    vocab = f"vocab {d['vocab_size']}" + ("" if model_vocab == d["vocab_size"] else
                                         f" (the model's {model_vocab}: padded to a multiple of TP)")
    return f"{what}, {tok}, {vocab}"


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [f"# Progressive scaling in miniature (budget `{res['budget']}`, seeds {res['seeds']})", "",
             f"**{res['headline']}**", "",
             f"Dataset: {dataset_prose(s['dataset'], s['vocab_size'])}; {s['train_tokens_available']:,} train "
             f"tokens. Model d={s['d_model']}, layers={s['n_layers']}, seq={s['seq_len']}, "
             f"{s['tokens_per_step']:,} tokens/step, "
             f"TP {s['tp']}, {s['jobs']} launches at a time. FLOPs = 3 × forward (model/flops.py); growth "
             "costs no training FLOPs. Arms are compared at equal cumulative FLOPs (linear interpolation of the val "
             "curves in FLOPs); intervals are two-sided 95% Student-t over seeds.", "",
             "## Runs (per seed)", "",
             "| arm | run | tokens qkv/proj/ffn | params | steps | train tokens | FLOPs | peak LR → min, warmup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['arm']} | {r['stage']} | {_fmt_tokens(r['tokens'])} | {r['params']:,} | {r['steps']} | "
                     f"{r['train_tokens']:,} | {r['flops']:.3g} | {r['lr']:g} → {r['min_lr']:g}, "
                     f"{r['warmup_frac']:g} |")
    reg = res["regime"]
    lines += ["", "## Results", "",
              "| arm | total FLOPs | final val loss per seed | mean | post-growth bump per growth (mean) |",
              "|---|---|---|---|---|"]
    for name, arm in res["arms"].items():
        finals = arm["final_val_loss"]
        bump = arm.get("post_growth_bump")
        bump_txt = ", ".join(f"{sum(b[i] for b in bump) / len(bump):+.3f}" for i in range(len(bump[0]))) \
            if bump else "—"
        lines.append(f"| {name} | {arm['flops']:.3g} | {', '.join(f'{x:.4f}' for x in finals)} | "
                     f"{sum(finals) / len(finals):.4f} | {bump_txt} |")
    cr = res["compute_ratio"]
    lines += ["",
              f"- **regime.ok = {str(reg['ok']).lower()}**: scratch final {reg['scratch_final']:.4f} vs stage 1 on "
              f"the same tokens {reg['small_same_tokens_final']:.4f} (mean; {reg['rule']}).",
              "- **growth_gain** (no_growth − grow_exact at the ladder's final FLOPs): "
              f"{_ci(res['growth_gain'], '+.4f')}.",
              f"- growth_gain of the official recipe (no_growth − grow_official): "
              f"{_ci(res['growth_gain_official'], '+.4f')}.",
              f"- official − exact final val loss: {_ci(res['exact_vs_official'], '+.4f')}.",
              "- **compute_ratio** (ladder FLOPs to first reach scratch's final val loss ÷ scratch FLOPs): " +
              (_ci(cr, ".3f") if cr is not None else "null (never reached in " +
               f"{sum(x is None for x in res['compute_ratio_per_seed'])} of {len(res['seeds'])} seeds)") +
              f"; per seed {res['compute_ratio_per_seed']}.",
              "- gain over scratch (scratch's val loss at the arm's final FLOPs − the arm's final; scratch is "
              "mid-schedule there, its LR not yet decayed, which favours the arm): " +
              "; ".join(f"{a} " + (_ci(v, "+.4f") if v is not None else "null (scratch spent less)")
                        for a, v in res["gain_over_scratch"].items()) + ".",
              "- post-growth bump = the grown stage's first val loss − the previous stage's final val loss.",
              f"- wall time {res['wall_s']['total']:.0f} s" + (
                  f" (this invocation; --resume reused {res['wall_s']['runs_reused']} finished runs)"
                  if res["wall_s"].get("runs_reused") else "") + ".", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Val loss of every arm against cumulative FLOPs: the mean over seeds and the min–max band; growth points
    and scratch's final loss marked. Written to a temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lo_y, hi_y = math.inf, -math.inf
    for name, arm in res["arms"].items():
        color, label = ARM_STYLE[name]
        curves = [c["points"] for c in arm["curves"]]
        m = mean_curve(curves)
        ax.plot(m["flops"], m["mean"], "-", color=color, lw=1.5, label=f"{label}, mean of {len(curves)}")
        ax.fill_between(m["flops"], m["min"], m["max"], color=color, alpha=0.2, lw=0)
        lo_y, hi_y = min(lo_y, min(m["min"])), max(hi_y, max(m["max"]))
    for i, f in enumerate(res["growth_flops"]):
        ax.axvline(f, color="tab:blue", ls=":", lw=0.9)
        ax.text(f, 0.98, f" growth {i + 1}", transform=ax.get_xaxis_transform(), fontsize=7, va="top",
                color="tab:blue")
    ax.axhline(res["regime"]["scratch_final"], color="tab:gray", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Progressive scaling in miniature (budget {res['budget']}; band = min–max over seeds)",
                 fontsize=10)
    ax.set_ylim(lo_y - 0.05, min(hi_y, lo_y + 2.0) + 0.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
