"""The official TokenFormer forward, transcribed from Haiyang-W/TokenFormer (megatron/model/tokenformer.py,
gpt2_model.py, norms.py, positional_embeddings.py) to run on an official state_dict: the oracle of the
import test. Layout [s, b, h] as the official code; Pattention through `model/official.py`; attention as an
explicit masked softmax (the official flash-attention computes the same function); no tensor parallelism.

Also writes checkpoints in the two official layouts (pipeline-indexed keys), as the official code does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenformer_dist.model.official import official_pattention


def neox_config(d: int, layers: int, heads: int, qkv: int, proj: int, ffn: int, seq: int) -> dict:
    """The keys of configs/tokenformer/150M_eval.yml that define the model (other keys omitted)."""
    return {"pipe_parallel_size": 1, "model_parallel_size": 1, "num_layers": layers, "hidden_size": d,
            "num_attention_heads": heads, "qkv_slot_num": qkv, "proj_slot_num": proj, "ffn_slot_num": ffn,
            "seq_length": seq, "max_position_embeddings": seq, "pos_emb": "rotary", "rotary_pct": 0.25,
            "no_weight_tying": False, "norm": "layernorm_nonparam", "final_norm": "layernorm",
            "gpt_j_residual": False, "output_layer_parallelism": "column", "use_bias_in_attn_linear": False,
            "attention_config": [[["tokenformer"], layers]], "norm_activation_type": "l2_norm_gelu",
            "init_method": "normal", "output_layer_init_method": "wang_init",
            "tokenizer-type": "HFTokenizer", "vocab-file": "./tokenizer.json"}


def write_neox_yaml(path: Path, cfg: dict) -> Path:
    """GPT-NeoX style: a JSON-like mapping with comments (what the official configs look like)."""
    lines = ["# written by the test in the official configs' style", "{"]
    for k, v in cfg.items():
        lines.append(f"  {_json(k)}: {_json(v)},")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _json(v) -> str:
    import json

    return json.dumps(v)


def random_official_state(cfg: dict, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A PipelineModule state_dict: `tied_modules.embed.*`, layers at index i+2, the final norm at L+3."""
    g = torch.Generator().manual_seed(seed)
    d, L = cfg["hidden_size"], cfg["num_layers"]

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"tied_modules.embed.word_embeddings.weight": rnd(vocab, d)}
    for i in range(L):
        for name, n in (("query", cfg["qkv_slot_num"]), ("key", cfg["qkv_slot_num"]),
                        ("value", cfg["qkv_slot_num"]), ("proj", cfg["proj_slot_num"])):
            sd[f"{i + 2}.attention.{name}.key_param_tokens"] = rnd(n, d, std=0.5)
            sd[f"{i + 2}.attention.{name}.value_param_tokens"] = rnd(n, d, std=0.1)
        sd[f"{i + 2}.mlp.key_param_tokens"] = rnd(cfg["ffn_slot_num"], d, std=0.5)
        sd[f"{i + 2}.mlp.value_param_tokens"] = rnd(cfg["ffn_slot_num"], d, std=0.1)
    sd[f"{L + 3}.norm.weight"] = 1 + rnd(d, std=0.1)
    sd[f"{L + 3}.norm.bias"] = rnd(d, std=0.1)
    return sd


def write_deepspeed_layout(root: Path, sd: dict[str, torch.Tensor], cfg: dict, step: int = 600,
                           dtype: torch.dtype = torch.float16) -> Path:
    """checkpoints/latest + global_stepN/layer_XX-model_00-model_states.pt (+ configs, + an mp_rank file
    holding RNG state as numpy arrays, which a tensors-only reader must never need)."""
    tag = root / f"global_step{step}"
    (tag / "configs").mkdir(parents=True)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if key.startswith("tied_modules.embed."):
            idx, rest = 0, key[len("tied_modules.embed."):]
        else:
            head, _, rest = key.partition(".")
            idx = int(head)
        layers.setdefault(idx, {})[rest] = t.to(dtype)
    for idx, tensors in layers.items():
        torch.save(tensors, tag / f"layer_{idx:02d}-model_00-model_states.pt")
    torch.save({"iteration": step, "np_rng_state": np.random.get_state()}, tag / "mp_rank_00_model_states.pt")
    write_neox_yaml(tag / "configs" / "model.yml", cfg)
    (root / "latest").write_text(f"global_step{step}")
    return root


def _rotary_tables(dim: int, seq: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.einsum("i,j->ij", torch.arange(seq).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


@torch.no_grad()
def official_logits(sd: dict[str, torch.Tensor], cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] of the official model for `tokens` [b, s] (fp32)."""
    sd = {k: v.float() for k, v in sd.items()}
    d, L, H = cfg["hidden_size"], cfg["num_layers"], cfg["num_attention_heads"]
    hd, eps = d // H, 1e-5
    rot = int(hd * cfg["rotary_pct"])
    norm_type = cfg["norm_activation_type"]
    emb = sd["tied_modules.embed.word_embeddings.weight"]
    x = F.embedding(tokens, emb).transpose(0, 1)  # [s, b, d]
    s, b = x.shape[:2]
    cos, sin = _rotary_tables(rot, s)

    def patt(h, prefix):
        return official_pattention(h, sd[f"{prefix}.key_param_tokens"], sd[f"{prefix}.value_param_tokens"],
                                   norm_type)

    for i in range(L):
        p = f"{i + 2}"
        h = F.layer_norm(x, (d,), eps=eps)  # LayerNorm_NonParam
        q, k, v = (patt(h, f"{p}.attention.{n}").view(s, b, H, hd) for n in ("query", "key", "value"))
        q_rot, k_rot = (q[..., :rot] * cos) + (_rotate_half(q[..., :rot]) * sin), \
                       (k[..., :rot] * cos) + (_rotate_half(k[..., :rot]) * sin)
        q, k = torch.cat((q_rot, q[..., rot:]), -1), torch.cat((k_rot, k[..., rot:]), -1)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        ctx = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).reshape(s, b, d)
        x = x + patt(ctx, f"{p}.attention.proj")
        x = x + patt(F.layer_norm(x, (d,), eps=eps), f"{p}.mlp")
    x = F.layer_norm(x, (d,), sd[f"{L + 3}.norm.weight"], sd[f"{L + 3}.norm.bias"], eps=eps)
    return F.linear(x, emb).transpose(0, 1)
