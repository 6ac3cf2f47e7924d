"""Export a checkpoint as a Hugging Face folder that `transformers` loads with trust_remote_code.

    python tools/export_hf.py --ckpt RUN_OR_CKPT --out DIR [--tokenizer DATASET/tokenizer.model]

DIR/
    config.json                 TokenFormerConfig (every ModelConfig field) + auto_map
    model.safetensors           full, unsharded fp32 weights under `model.` (tau buffers included), read from
                                the checkpoint's per-TP-rank master weights: any TP degree, any ZeRO stage
    modeling_tokenformer.py, configuration_tokenformer.py, tokenization_tokenformer.py
                                the package's transformers classes (tokenformer_dist/inference/hf/), and
    tf_*.py                     the package's own model modules they import, copied with the imports made
                                relative (one model definition: nothing is restated for the export)
    tokenizer.model, tokenizer_config.json   the dataset's sentencepiece model, encoded as data_prep does
    README.md                   model card

The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from tokenformer_dist.atomic import atomic_dir

PACKAGE = "tokenformer_dist"
HF_PACKAGE = __name__.rpartition(".")[0]  # tokenformer_dist.inference.hf: the transformers classes
ENTRY_MODULES = tuple(f"{HF_PACKAGE}.{name}" for name in
                      ("configuration_tokenformer", "modeling_tokenformer", "tokenization_tokenformer"))
WEIGHT_PREFIX = "model."
AUTO_MAP = {"AutoConfig": "configuration_tokenformer.TokenFormerConfig",
            "AutoModelForCausalLM": "modeling_tokenformer.TokenFormerForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_tokenformer.TokenFormerTokenizer", None]}
# packages the exported code must never need: the single-device model runs on torch alone
FORBIDDEN_IMPORTS = ("megatron", "deepspeed", "ray", "zarr")


# ------------------------------------------------------------------------------------------------ sources
def flat_name(module: str) -> str:
    """File name (without .py) of a package module inside the flat exported folder."""
    if module.startswith(HF_PACKAGE + "."):
        return module.rpartition(".")[2]
    return "tf_" + "_".join(module.split(".")[1:])


def _module_file(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package: `name` is an attribute
        return False


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """Absolute module name of an ImportFrom (None for a relative import of nothing in this package)."""
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def source_closure(entries: tuple[str, ...] = ENTRY_MODULES) -> dict[str, str]:
    """{package module: source with its package imports rewritten to flat relative ones}, following every
    import of this package (also those inside functions) from the entry modules."""
    todo, done = list(entries), {}
    while todo:
        module = todo.pop()
        if module in done:
            continue
        path = _module_file(module)
        if path is None:
            raise ValueError(f"{module}: no Python source to export")
        if path.name == "__init__.py":
            raise ValueError(f"{module}: the exported code imports a package __init__; import the module that "
                             f"defines the name instead")
        text = path.read_text()
        tree = ast.parse(text)
        lines = text.splitlines(keepends=True)
        edits: list[tuple[int, int, str]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    root = alias.name.split(".")[0]
                    if root == PACKAGE:
                        raise ValueError(f"{path}:{node.lineno}: `import {alias.name}` cannot be exported; use "
                                         f"`from {alias.name} import ...`")
                    if root in FORBIDDEN_IMPORTS:
                        raise ValueError(f"{path}:{node.lineno}: the exported model code imports {root}")
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, module, False)
                if target is None:
                    continue
                root = target.split(".")[0]
                if root in FORBIDDEN_IMPORTS:
                    raise ValueError(f"{path}:{node.lineno}: the exported model code imports {root}")
                if root != PACKAGE:
                    continue
                indent = lines[node.lineno - 1][: node.col_offset]
                stmts = []
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if _is_module(sub):
                        todo.append(sub)  # `from pkg import module`
                        stmts.append(f"from . import {flat_name(sub)} as {alias.asname or alias.name}")
                    else:
                        todo.append(target)
                        name = alias.name + (f" as {alias.asname}" if alias.asname else "")
                        stmts.append(f"from .{flat_name(target)} import {name}")
                edits.append((node.lineno, node.end_lineno or node.lineno, indent + f"\n{indent}".join(stmts) + "\n"))
        for start, end, new in sorted(edits, reverse=True):
            lines[start - 1:end] = [new]
        done[module] = "".join(lines)
    return done


# ------------------------------------------------------------------------------------------------ weights
def write_full_weights(ckpt: Path, out_file: Path) -> int:
    """model.safetensors with full, unsharded fp32 tensors; returns the parameter count (tau excluded).
    Reads one tensor at a time from the per-TP-rank weight files (any TP degree, any ZeRO stage); a sharded
    tensor's row blocks (sharding.ROWS) are streamed one after another, never joined in memory."""
    from tokenformer_dist.checkpoint.engine import iter_weight_blocks, weight_specs
    from tokenformer_dist.checkpoint.safetensors_stream import StreamingSafetensorsWriter

    specs, params = [], 0
    for name, shape in weight_specs(ckpt):
        specs.append((WEIGHT_PREFIX + name, shape, torch.float32))
        params += 0 if name.endswith(".tau") else math.prod(shape)
    writer = StreamingSafetensorsWriter(out_file, specs, metadata={"format": "pt"})
    try:
        for name, parts in iter_weight_blocks(ckpt):
            writer.write(WEIGHT_PREFIX + name, [p.float() for p in parts])
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return params


# ------------------------------------------------------------------------------------------------ export
def export_hf(ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write the Hugging Face folder `out` (must not exist) for a run dir / checkpoint / weights dir."""
    from tokenformer_dist.checkpoint.engine import read_config, resolve_checkpoint
    from tokenformer_dist.inference.generate import find_tokenizer, load_sentencepiece
    from tokenformer_dist.inference.hf.configuration_tokenformer import MODEL_FIELDS, TokenFormerConfig

    src = resolve_checkpoint(ckpt)
    cfg = read_config(src)
    tok_path = find_tokenizer(src, cfg.data.path, tokenizer)
    if tok_path.suffix != ".model":
        raise ValueError(f"{tok_path}: the export ships sentencepiece tokenizers (.model); "
                         f"pass --tokenizer DATASET/tokenizer.model")
    sp = load_sentencepiece(tok_path)
    if sp.vocab_size() > cfg.model.vocab_size:
        raise ValueError(f"{tok_path}: vocabulary {sp.vocab_size()} > the model's {cfg.model.vocab_size}")
    out = Path(out)
    with atomic_dir(out) as tmp:
        params = write_full_weights(src, tmp / "model.safetensors")
        fields = {name: getattr(cfg.model, name) for name in MODEL_FIELDS}
        hf_cfg = TokenFormerConfig(eod_id=sp.eos_id(), **fields)
        hf_cfg.auto_map = AUTO_MAP
        hf_cfg.architectures = ["TokenFormerForCausalLM"]
        hf_cfg.save_pretrained(tmp)
        for module, source in source_closure().items():
            (tmp / f"{flat_name(module)}.py").write_text(source)
        shutil.copyfile(tok_path, tmp / "tokenizer.model")
        eos, unk = sp.id_to_piece(sp.eos_id()), sp.id_to_piece(sp.unk_id())
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "TokenFormerTokenizer", "auto_map": TOKENIZER_AUTO_MAP, "eos_token": eos,
            "unk_token": unk, "pad_token": eos, "model_max_length": cfg.model.seq_len,
            "clean_up_tokenization_spaces": False}, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(src, cfg, params, out.name))
    return out


def model_card(src: Path, cfg: Any, params: int, name: str) -> str:
    m = cfg.model
    meta = src / "meta.json"
    step = json.loads(meta.read_text()).get("step") if meta.is_file() else None
    rows = "\n".join(f"| {k} | {v} |" for k, v in (
        ("parameters", f"{params:,}"), ("layers", m.n_layers), ("d_model", m.d_model), ("heads", m.n_heads),
        ("parameter tokens qkv / proj / ffn", f"{m.qkv_tokens} / {m.proj_tokens} / {m.ffn_tokens}"),
        ("Pattention normalization", m.norm), ("context", m.seq_len), ("vocabulary", m.vocab_size),
        ("source", f"{src}" + (f" (step {step})" if step is not None else ""))))
    return f"""---
library_name: transformers
tags: [tokenformer, pattention, causal-lm]
---
# {name}

A [TokenFormer](https://arxiv.org/abs/2410.23168) language model (every linear projection is token-parameter
attention, "Pattention") trained with tokenformer-dist and exported by `tools/export_hf.py`.

| | |
|---|---|
{rows}

The modeling code in this folder is the training project's own model (copied with relative imports);
`trust_remote_code=True` is needed. The tokenizer is the training data's sentencepiece model and encodes text
exactly as the training data was encoded (no BOS/EOS added; `</s>` ends a document).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
ids = tok("The river", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))
```

Zero-shot evaluation with lm-evaluation-harness (the paper's tasks):

```bash
lm_eval --model hf --model_args pretrained={name},trust_remote_code=True,dtype=float32 \\
    --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande --batch_size 8
```

Padding: right padding only (what lm-eval and single-prompt `generate()` use).
"""


def main(argv: list[str] | None = None) -> int:
    from tokenformer_dist.cli import ArgumentParser

    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face folder.")
    parser.add_argument("--ckpt", required=True, help="run dir, trainer checkpoint or weights dir (any TP/ZeRO)")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece model (default: the checkpoint's dataset tokenizer.model)")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.ckpt, args.out, args.tokenizer)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
