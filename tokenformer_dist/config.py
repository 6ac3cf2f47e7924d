"""Configuration: dataclasses, YAML loading, `--set a.b=value` overrides, and validation.

`python -m tokenformer_dist.config CONFIG.yaml [--set a.b=v ...] [--tp N]` prints the resolved config and,
as its last line, `parameters: N` — the exact parameter count of the model that config builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
PATTENTION_IMPLS = ("lean", "reference")  # two implementations of the same function (model/pattention.py)
DTYPES = ("auto", "fp32", "bf16")
REDUCE_DTYPES = ("fp32", "bf16")
COMPILE_SETTINGS = ("auto", True, False)  # train.compile; auto = on for CUDA, off on CPU
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile
# torch.compile backends: inductor generates fused kernels (what train.compile is for); aot_eager traces and
# partitions the same graphs but runs them op by op — the first step when bisecting a compile problem
COMPILE_BACKENDS = ("inductor", "aot_eager")


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the file, the key and what is valid."""


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    seq_len: int = 1024
    qkv_tokens: int = 576  # parameter tokens of each of the Q, K, V Pattentions
    proj_tokens: int = 576  # output projection Pattention
    ffn_tokens: int = 2304  # the FFN is one Pattention
    norm: str = "l2_norm_gelu"  # l2_norm_gelu | gelu_l2_norm | softmax
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    init_std: float = 0.02  # key tokens and embedding; value tokens use 2 / (n_layers * sqrt(d_model))
    ln_eps: float = 1e-5
    pattention_impl: str = "lean"  # lean (keeps one [tokens, n] tensor for backward) | reference (plain autograd)


@dataclass
class ParallelConfig:
    tp: int = 1
    zero_stage: int = 1
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    # bf16 runs: dtype of the DP gradient reduction (and of the accumulation where DeepSpeed honours it,
    # ZeRO 1 and 3; see docs/training.md, "bf16")
    grad_reduce_dtype: str = "fp32"
    # ZeRO communication (GPU; DeepSpeed's CPU accelerator has no second stream to overlap with). Buckets in
    # elements: 5e7 = 200 MB of fp32 per bucket, large enough to reach NCCL's bus bandwidth on 8-GPU NVLink
    # nodes and small enough that overlap_comm's ~4.5 buckets of buffers stay ~1 GB.
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    # bounds every collective, including the other ranks' wait while rank 0 converts a checkpoint to
    # DeepSpeed's universal format (minutes at 1.4B parameters)
    dist_timeout_minutes: float = 60.0


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    steps: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_frac: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3
    seed: int = 1234
    # ranks agree on a preemption signal every this many steps (one host sync each time): a SIGTERM/SIGUSR1
    # is acted on after at most this many further steps
    preempt_check_every: int = 10
    # regional torch.compile of the blocks and the loss head (model/compile.py): auto | true | false; auto is
    # on for CUDA (where eager is host-bound: thousands of small kernels per step), off on CPU (compile time)
    compile: bool | str = "auto"
    # torch.compile's mode; "reduce-overhead" adds CUDA graphs (docs/performance.md says what was measured)
    compile_mode: str = "default"
    compile_backend: str = "inductor"  # inductor | aot_eager (no code generation: for bisecting a compile problem)


@dataclass
class DataConfig:
    path: str = "data/sample"
    seed: int = 1234
    prefetch_batches: int = 4  # micro-batches read ahead by the loader's background thread (0: none)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: str = "<defaults>"  # where the config came from, for error messages

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the dataclass field type `tp` (int, float, bool, str)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "6e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, where: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{source}: unknown key {path!r} (valid keys: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, source)
        else:
            kwargs[key] = _coerce(value, tp, f"{source}: {path}")
    return cls(**kwargs)


def _set_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value, e.g. --set train.steps=100")
    path, _, text = assignment.partition("=")
    keys = path.strip().split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(text)


def validate(cfg: Config) -> Config:
    """Raise ConfigError (one line, naming the key and what is valid) for values the model cannot use."""
    src, m, p, t = cfg.source, cfg.model, cfg.parallel, cfg.train
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.seq_len": m.seq_len, "model.qkv_tokens": m.qkv_tokens,
        "model.proj_tokens": m.proj_tokens, "model.ffn_tokens": m.ffn_tokens, "parallel.tp": p.tp,
        "train.micro_batch_size": t.micro_batch_size, "train.grad_accum_steps": t.grad_accum_steps,
        "train.steps": t.steps, "train.log_every": t.log_every, "train.eval_every": t.eval_every,
        "train.eval_batches": t.eval_batches, "train.save_every": t.save_every, "train.keep_last": t.keep_last,
        "model.init_std": m.init_std, "model.ln_eps": m.ln_eps, "model.rotary_base": m.rotary_base,
        "train.lr": t.lr, "train.preempt_check_every": t.preempt_check_every,
        "parallel.reduce_bucket_size": p.reduce_bucket_size,
        "parallel.allgather_bucket_size": p.allgather_bucket_size,
        "parallel.dist_timeout_minutes": p.dist_timeout_minutes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{src}: {key} must be > 0, got {value}")
    choices = {"model.norm": (m.norm, NORMALIZATIONS), "model.pattention_impl": (m.pattention_impl, PATTENTION_IMPLS),
               "parallel.dtype": (p.dtype, DTYPES), "parallel.grad_reduce_dtype": (p.grad_reduce_dtype, REDUCE_DTYPES)}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{src}: {key} must be one of {', '.join(valid)}, got {value!r}")
    if t.compile not in COMPILE_SETTINGS or isinstance(t.compile, int) and not isinstance(t.compile, bool):
        raise ConfigError(f"{src}: train.compile must be one of auto, true, false, got {t.compile!r}")
    if t.compile_backend not in COMPILE_BACKENDS:
        raise ConfigError(f"{src}: train.compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, "
                          f"got {t.compile_backend!r}")
    if t.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"{src}: train.compile_mode must be one of {', '.join(COMPILE_MODES)}, "
                          f"got {t.compile_mode!r}")
    if cfg.data.prefetch_batches < 0:
        raise ConfigError(f"{src}: data.prefetch_batches must be >= 0, got {cfg.data.prefetch_batches}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"{src}: model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    head_dim = m.d_model // m.n_heads
    rot = int(head_dim * m.rotary_pct)
    if not 0.0 <= m.rotary_pct <= 1.0 or rot % 2:
        raise ConfigError(
            f"{src}: model.rotary_pct={m.rotary_pct} must be in [0, 1] and give an even number of rotary "
            f"dims of head_dim={head_dim} (got {head_dim * m.rotary_pct:g})"
        )
    if not 0.0 <= t.warmup_frac < 1.0:
        raise ConfigError(f"{src}: train.warmup_frac must be in [0, 1), got {t.warmup_frac}")
    if not 0.0 <= t.min_lr <= t.lr:
        raise ConfigError(f"{src}: train.min_lr must be in [0, train.lr={t.lr}], got {t.min_lr}")
    for key in ("qkv_tokens", "proj_tokens", "ffn_tokens", "vocab_size"):
        n = getattr(m, key)
        if n % p.tp:
            lo, hi = (n // p.tp) * p.tp, (n // p.tp + 1) * p.tp
            valid = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise ConfigError(
                f"{src}: model.{key}={n} is not divisible by parallel.tp={p.tp}; nearest valid: {valid}"
            )
    return cfg


def compile_on(cfg: Config, device_type: str) -> bool:
    """Whether `train.compile` compiles on a device of this type ("cuda", "cpu")."""
    return cfg.train.compile is True or (cfg.train.compile == "auto" and device_type == "cuda")


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The parsed YAML of `path` ({} when empty), or a one-line ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in field order: what every checkpoint and weights dir saves, and what
    load_config reads back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (), tp: int | None = None) -> Config:
    """Read a YAML config, apply `--set` overrides (and a --tp flag), validate, and return it."""
    source = str(path) if path is not None else "<defaults>"
    raw: Any = read_yaml(path) if path is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    for assignment in overrides:
        _set_override(raw, assignment)
    if tp is not None:
        raw.setdefault("parallel", {})["tp"] = tp
    cfg = _build(Config, raw, "", source)
    cfg.source = source
    return validate(cfg)


def parameter_tokens_per_layer(m: ModelConfig) -> int:
    """Σ n over one layer's five Pattentions: Q, K, V (qkv_tokens each), the output projection, the FFN."""
    return 3 * m.qkv_tokens + m.proj_tokens + m.ffn_tokens


def pattention_params_per_layer(m: ModelConfig) -> int:
    """One layer's Pattention parameters: n·(d_in + d_out) per Pattention, and every d_in, d_out is d_model."""
    return 2 * m.d_model * parameter_tokens_per_layer(m)


def param_count(m: ModelConfig) -> int:
    """Exact parameter count: tied embedding, 5 Pattentions per layer, final LayerNorm."""
    d = m.d_model
    return m.vocab_size * d + m.n_layers * pattention_params_per_layer(m) + 2 * d


def non_embedding_param_count(m: ModelConfig) -> int:
    return param_count(m) - m.vocab_size * m.d_model


def add_config_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    """The config flags every entry point shares."""
    parser.add_argument("--config", required=config_required, help="YAML config (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (overrides parallel.tp)")


def main(argv: list[str] | None = None) -> int:
    from tokenformer_dist.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tp", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, args.tp)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(config_yaml(cfg).rstrip())
    print(f"non_embedding_parameters: {non_embedding_param_count(cfg.model)}")
    print(f"parameters: {param_count(cfg.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
