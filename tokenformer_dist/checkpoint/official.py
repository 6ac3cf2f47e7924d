"""Read the official TokenFormer checkpoints (Haiyang-W/TokenFormer, a GPT-NeoX fork) into this project's weights.

The layout was read from the official repository's sources (commit 4d56c73):
  megatron/model/gpt2_model.py       GPT2ModelPipe.init_specs: the pipeline layer list
  megatron/model/tokenformer.py      Pattention (key_param_tokens, value_param_tokens), ParallelSelfAttention
                                     (query, key, value, proj), ParallelTokenformerLayer (attention, mlp)
  megatron/model/norms.py            LayerNorm_NonParam (no parameters), final "layernorm" (weight, bias)
  megatron/model/positional_embeddings.py   RotaryEmbedding / rotate_half
  megatron/checkpointing.py, megatron/training.py   how checkpoints are saved and the eval checkpoint loaded
  configs/tokenformer/*_eval.yml, configs/incremental_scaling_openwebtext2/*.yml   the config keys

Two layouts hold the same tensors:
  * the published Pile models (TokenFormer-150M/450M/900M/1-5B on the Hugging Face hub): ONE file
    `pytorch_model.bin`, the state_dict of DeepSpeed's PipelineModule (written by zero_to_fp32.py, fp32),
    loaded by the official eval with `model.module.load_state_dict(torch.load(eval_ckpt))`. Keys are
    prefixed by the index of the layer in the pipeline spec list:
        tied_modules.embed.word_embeddings.weight      [padded_vocab, d]   (tied input/output embedding)
        {i+2}.attention.{query,key,value,proj}.{key,value}_param_tokens   [n, d]   for layer i (index 1 is
        {i+2}.mlp.{key,value}_param_tokens              [n_ffn, d]           a function: no weights)
        {L+3}.norm.weight, {L+3}.norm.bias              [d]  (final LayerNorm; L+2 is again a function)
  * a GPT-NeoX DeepSpeed checkpoint directory (the OWT 354M model, 354M_TokenFormer_Openwebtext2):
    `latest` names a tag `global_stepN/`, holding one `layer_{idx:02d}-model_00-model_states.pt` per layer
    (the same keys without the `{idx}.` prefix; the embedding in layer_00), `mp_rank_00_model_states.pt`
    (optimizer/RNG state, never read here) and `configs/*.yml`. Module weights are in the training dtype
    (fp16 for the published runs).

Conventions matched (FACTS §1; `model/official.py` is the Pattention oracle): τ = √n of the layer (the
official code takes √n of the current token count; it is recorded in each `tau` buffer), l2_norm_gelu
without epsilon, non-parametric pre-LN with eps `layernorm_epsilon` (1e-5), a parametric final LayerNorm,
rotary on the first `rotary_pct` of each head's dims with the rotate-half (non-interleaved) pairing and
base `rotary_emb_base`, heads as contiguous d/H slices, attention scale 1/√head_dim, tied output layer.
The official code caches rotary cos/sin in the training precision (fp16); this project computes them in
fp32, which is the exact function the fp16 tables approximate.

Files are read with `torch.load(weights_only=True)` (tensors only; nothing is unpickled), one at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from tokenformer_dist.atomic import atomic_path
from tokenformer_dist.config import NORMALIZATIONS, Config, ModelConfig, validate

PATTENTION_NAMES = {"query": "attn.query", "key": "attn.key", "value": "attn.value", "proj": "attn.proj"}
PARAM_SUFFIX = {"key_param_tokens": "key_tokens", "value_param_tokens": "value_tokens"}
SUPPORTED = {"norm": "layernorm_nonparam", "pos_emb": "rotary"}
LAYER_FILE = re.compile(r"layer_(\d+)-model_00-model_states\.pt$")


class OfficialCheckpointError(ValueError):
    """The input is not an official TokenFormer checkpoint this importer can convert (one-line message)."""


# ------------------------------------------------------------------------------------------------ config
def read_neox_config(files: list[Path]) -> dict[str, Any]:
    """GPT-NeoX config files merged in order (later files win), keys normalized to underscores."""
    merged: dict[str, Any] = {}
    for f in files:
        try:
            data = yaml.safe_load(Path(f).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise OfficialCheckpointError(f"{f}: cannot read a GPT-NeoX config ({e.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise OfficialCheckpointError(f"{f}: a GPT-NeoX config must be a mapping")
        merged.update({str(k).replace("-", "_"): v for k, v in data.items()})
    return merged


def model_config_from_neox(neox: dict[str, Any], vocab_size: int, source: str) -> ModelConfig:
    """This project's ModelConfig for an official config; raises for architectures it does not have."""
    def need(key: str) -> Any:
        if neox.get(key) is None:
            raise OfficialCheckpointError(f"{source}: missing key {key!r} (a TokenFormer config has it)")
        return neox[key]

    for key, want in SUPPORTED.items():
        got = neox.get(key, {"norm": "layernorm", "pos_emb": "learned"}[key])  # GPT-NeoX defaults
        if got != want:
            raise OfficialCheckpointError(f"{source}: {key} = {got!r}; this model has {key} = {want!r} only")
    if neox.get("final_norm", "layernorm") not in ("layernorm", "layernorm_nonparam", None):
        raise OfficialCheckpointError(f"{source}: final_norm = {neox['final_norm']!r}; valid: layernorm")
    for key in ("no_weight_tying", "gpt_j_residual", "use_qk_layernorm"):
        if neox.get(key):
            raise OfficialCheckpointError(f"{source}: {key} = true is not this architecture (valid: false)")
    if int(neox.get("model_parallel_size", 1)) != 1:
        raise OfficialCheckpointError(f"{source}: model_parallel_size = {neox['model_parallel_size']}; the "
                                      f"official TokenFormer code writes model_parallel_size 1 only")
    layers = int(need("num_layers"))
    types = _attention_types(neox.get("attention_config"), layers)
    if any(t != "tokenformer" for t in types):
        raise OfficialCheckpointError(f"{source}: attention_config has {sorted(set(types))}; valid: tokenformer")
    norm = neox.get("norm_activation_type", "l2_norm_gelu")
    if norm not in NORMALIZATIONS:
        raise OfficialCheckpointError(f"{source}: norm_activation_type {norm!r}; valid: {', '.join(NORMALIZATIONS)}")
    seq = neox.get("seq_length") or neox.get("max_position_embeddings")
    return ModelConfig(
        vocab_size=vocab_size, d_model=int(need("hidden_size")), n_layers=layers,
        n_heads=int(need("num_attention_heads")), seq_len=int(seq or 2048),
        qkv_tokens=int(need("qkv_slot_num")), proj_tokens=int(need("proj_slot_num")),
        ffn_tokens=int(need("ffn_slot_num")), norm=norm, rotary_pct=float(neox.get("rotary_pct", 1.0)),
        rotary_base=float(neox.get("rotary_emb_base", 10000)),
        ln_eps=float(neox.get("layernorm_epsilon", 1e-5)),
    )


def _attention_types(spec: Any, layers: int) -> list[str]:
    """GPT-NeoX's attention_config, e.g. [[["tokenformer"], 12]], expanded to one type per layer."""
    if spec is None:
        return ["global"] * layers  # GPT-NeoX's default: a plain Transformer
    out: list[str] = []
    for types, count in spec:
        types = types if isinstance(types, list) else [types]
        out += [types[j % len(types)] for j in range(int(count))]
    return out[:layers]


# ------------------------------------------------------------------------------------------------ layout
def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or format error is one message
        raise OfficialCheckpointError(f"{path}: not a tensors-only torch checkpoint ({e.__class__.__name__})") \
            from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise OfficialCheckpointError(f"{path}: expected a state_dict of tensors")
    return sd


def locate(path: str | Path) -> tuple[str, Path]:
    """("bin", file) for a PipelineModule state_dict, ("deepspeed", global_step dir) for layer files."""
    p = Path(path)
    if p.is_file():
        return "bin", p
    if not p.is_dir():
        raise OfficialCheckpointError(f"{p}: no such file or directory")
    if (p / "pytorch_model.bin").is_file():
        return "bin", p / "pytorch_model.bin"
    if (p / "latest").is_file():  # a DeepSpeed save dir: `latest` names the tag
        tag = (p / "latest").read_text().strip()
        if (p / tag).is_dir():
            return locate(p / tag)
    if not (p / "latest").is_file() and (p / "checkpoints").is_dir():  # the zip's top-level folder
        return locate(p / "checkpoints")
    if any(LAYER_FILE.search(f.name) for f in p.iterdir()):
        return "deepspeed", p
    raise OfficialCheckpointError(f"{p}: neither pytorch_model.bin nor a GPT-NeoX DeepSpeed checkpoint "
                                  f"(latest + global_stepN/layer_XX-model_00-model_states.pt)")


def config_files(kind: str, where: Path, given: list[Path] | None) -> list[Path]:
    if given:
        return given
    candidates = sorted((where / "configs").glob("*.yml")) if kind == "deepspeed" else []
    if not candidates:
        candidates = sorted((where if where.is_dir() else where.parent).glob("*.yml"))
    if not candidates:
        raise OfficialCheckpointError(f"{where}: no GPT-NeoX config found next to the weights; pass --config "
                                      f"(e.g. the official repository's configs/tokenformer/150M_eval.yml)")
    return candidates


def _pipeline_tensors(kind: str, where: Path) -> Iterator[tuple[int | None, str, torch.Tensor]]:
    """(pipeline index or None for the tied embedding, key inside that layer, tensor)."""
    if kind == "bin":
        for key, t in _load(where).items():
            if key.startswith("tied_modules.embed."):
                yield None, key[len("tied_modules.embed."):], t
            else:
                idx, _, rest = key.partition(".")
                if not idx.isdigit():
                    raise OfficialCheckpointError(f"{where}: unexpected key {key!r} (not a TokenFormer "
                                                  f"PipelineModule state_dict)")
                yield int(idx), rest, t
        return
    files = sorted((int(m.group(1)), f) for f in where.iterdir() if (m := LAYER_FILE.search(f.name)))
    for idx, f in files:
        for key, t in _load(f).items():
            yield (None if idx == 0 else idx), key, t


def project_name(idx: int | None, key: str, n_layers: int, source: str) -> str | None:
    """This project's state_dict name of an official tensor (None: a tensor that carries no weight)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a deterministic buffer (saved only with rotary_save_freqs_buffer)
    if idx is None or idx == 0:
        if key == "word_embeddings.weight":
            return "embedding.weight"
    elif idx == n_layers + 3:
        if key in ("norm.weight", "norm.bias"):
            return f"final_norm.{key.split('.')[1]}"
    elif 2 <= idx < n_layers + 2:
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "attention" and parts[1] in PATTENTION_NAMES and parts[2] in PARAM_SUFFIX:
            return f"blocks.{idx - 2}.{PATTENTION_NAMES[parts[1]]}.{PARAM_SUFFIX[parts[2]]}"
        if len(parts) == 2 and parts[0] == "mlp" and parts[1] in PARAM_SUFFIX:
            return f"blocks.{idx - 2}.ffn.{PARAM_SUFFIX[parts[1]]}"
    raise OfficialCheckpointError(f"{source}: unexpected tensor {key!r} in pipeline layer {idx} "
                                  f"(a {n_layers}-layer TokenFormer has layers 0, 2..{n_layers + 1}, {n_layers + 3})")


def read_official(path: str | Path, config: list[Path] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, full fp32 tensors by this project's state_dict names, tau buffers included)."""
    kind, where = locate(path)
    cfg_files = config_files(kind, where, config)
    neox = read_neox_config(cfg_files)
    n_layers = int(neox.get("num_layers") or 0)
    if n_layers <= 0:
        raise OfficialCheckpointError(f"{cfg_files[0]}: missing key 'num_layers'")
    tensors: dict[str, torch.Tensor] = {}
    for idx, key, t in _pipeline_tensors(kind, where):
        name = project_name(idx, key, n_layers, str(where))
        if name is not None:
            tensors[name] = t.to(torch.float32)
    if "embedding.weight" not in tensors:
        raise OfficialCheckpointError(f"{where}: no word_embeddings.weight (layer 0 / tied_modules.embed)")
    mcfg = model_config_from_neox(neox, int(tensors["embedding.weight"].shape[0]), str(cfg_files[-1]))
    if "final_norm.weight" not in tensors and neox.get("final_norm") == "layernorm_nonparam":
        tensors["final_norm.weight"] = torch.ones(mcfg.d_model)  # a non-parametric final norm, exactly
        tensors["final_norm.bias"] = torch.zeros(mcfg.d_model)
    _add_tau(tensors, mcfg)
    _check_shapes(tensors, mcfg, str(where))
    return mcfg, tensors


def _pattentions(cfg: ModelConfig) -> Iterator[tuple[str, int]]:
    for i in range(cfg.n_layers):
        for name in ("query", "key", "value"):
            yield f"blocks.{i}.attn.{name}", cfg.qkv_tokens
        yield f"blocks.{i}.attn.proj", cfg.proj_tokens
        yield f"blocks.{i}.ffn", cfg.ffn_tokens


def _add_tau(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """τ = √n of each layer, as the official code computes it on the fly."""
    for prefix, n in _pattentions(cfg):
        tensors[f"{prefix}.tau"] = torch.tensor(math.sqrt(n), dtype=torch.float32)


def _check_shapes(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    want = {"embedding.weight": (cfg.vocab_size, cfg.d_model), "final_norm.weight": (cfg.d_model,),
            "final_norm.bias": (cfg.d_model,)}
    for prefix, n in _pattentions(cfg):
        want[f"{prefix}.key_tokens"] = want[f"{prefix}.value_tokens"] = (n, cfg.d_model)
        want[f"{prefix}.tau"] = ()
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise OfficialCheckpointError(f"{source}: missing tensors for {missing[:4]} (config says {cfg.n_layers} "
                                      f"layers)")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise OfficialCheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the config "
                                          f"gives {shape}")


def import_official(path: str | Path, out: str | Path, tp: int = 1, config: list[Path] | None = None) -> Path:
    """Convert an official checkpoint into a weights dir for `tp` ranks (usable by evaluate, generate,
    expand_tokens and --init-from). `out` appears only when complete."""
    from tokenformer_dist.checkpoint.weights import write_sharded_weights

    mcfg, tensors = read_official(path, config)
    cfg = Config(model=mcfg, source=str(path))
    cfg.parallel.tp = tp
    validate(cfg)
    order = sorted(tensors)
    return write_sharded_weights(out, cfg, ((k, tensors[k]) for k in order), tp,
                                 manifest_extra={"source": "official TokenFormer checkpoint",
                                                 "imported_from": str(Path(path).resolve())})


def main(argv: list[str] | None = None) -> int:
    """CLI of tools/import_official.py."""
    import shutil
    import sys

    from tokenformer_dist.cli import ArgumentParser

    parser = ArgumentParser(description="Convert an official TokenFormer (GPT-NeoX) checkpoint into "
                                                 "this project's weights dir.")
    parser.add_argument("--ckpt", required=True, help="pytorch_model.bin (or its folder), or a GPT-NeoX "
                                                      "DeepSpeed checkpoint dir (with `latest` or global_stepN/)")
    parser.add_argument("--out", required=True, help="output weights dir (must not exist)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to write for (default 1)")
    parser.add_argument("--config", nargs="+", type=Path, default=None,
                        help="the official GPT-NeoX config(s), e.g. configs/tokenformer/150M_eval.yml "
                             "(default: global_stepN/configs/*.yml, or *.yml next to the weights)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer to ship with the weights (tokenizer.json of GPT-NeoX-20B, or a "
                             "sentencepiece .model); generate and the HF export find it there")
    args = parser.parse_args(argv)
    try:
        if args.tp <= 0:
            raise OfficialCheckpointError(f"--tp {args.tp}: must be a positive integer")
        if args.tokenizer is not None and args.tokenizer.suffix not in (".json", ".model"):
            raise OfficialCheckpointError(f"--tokenizer {args.tokenizer}: expected tokenizer.json or a "
                                          f"sentencepiece .model")
        if args.tokenizer is not None and not args.tokenizer.is_file():
            raise OfficialCheckpointError(f"--tokenizer {args.tokenizer}: no such file")
        out = import_official(args.ckpt, args.out, args.tp, args.config)
    except (OfficialCheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.tokenizer is not None:
        name = "tokenizer.json" if args.tokenizer.suffix == ".json" else "tokenizer.model"
        with atomic_path(out / name) as tmp:
            shutil.copyfile(args.tokenizer, tmp)
    print(f"wrote {out} (tp {args.tp}) from {args.ckpt}")
    return 0
