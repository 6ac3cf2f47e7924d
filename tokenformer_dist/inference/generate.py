"""Sample text from a checkpoint.

    python -m tokenformer_dist.generate --ckpt RUN_OR_CKPT --prompt "The river" [--max-new-tokens 64]
    torchrun --nproc_per_node 2 -m tokenformer_dist.generate --ckpt RUN_OR_CKPT --prompt-file p.txt --json

PATH: a run directory (its latest checkpoint), one trainer checkpoint, or a weights dir, written at any TP
degree and ZeRO stage: plain `python` runs at TP 1, a launch of N processes at --tp (default: the largest degree
dividing N and the checkpoint's TP), resharding on load (launch.py). The prompt is encoded with the
dataset's sentencepiece model (the checkpoint's `data.path`/tokenizer.model, or a tokenizer shipped in a
weights dir; `--tokenizer` overrides) exactly as data_prep encodes documents (no BOS, no EOS), and decoding
stops at the end-of-document id. Greedy when --temperature is 0 (the default). With --json the last line is
{"text": completion, "tokens": [generated ids, not the prompt], "tokens_per_s": ...}.

Attention keeps a KV cache per layer (Pattention layers need none: their keys and values are parameters),
so each new token costs one position's forward; `--no-cache` recomputes the whole prefix instead.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenformer_dist.inference.launch import load_model
from tokenformer_dist.model.attention import KVCache

SPM_NAME = "tokenizer.model"
HF_TOKENIZER_NAME = "tokenizer.json"


# ------------------------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """The dataset's sentencepiece model (or a Hugging Face tokenizer.json shipped with imported weights).

    `encode` is exactly data_prep's per-document encoding without the end-of-document id."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: tokenizer file not found")
        if self.path.suffix == ".json":
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise ValueError(f"{self.path}: a tokenizer.json needs the `tokenizers` package "
                                 f"(pip install 'tokenformer-dist[hf]')") from None
            self._hf = HFTokenizer.from_file(str(self.path))
            self._sp = None
            eod = self._hf.token_to_id("<|endoftext|>")
            self.eod_id = 0 if eod is None else eod
            self.vocab_size = self._hf.get_vocab_size()
        else:
            self._sp = load_sentencepiece(self.path)
            self._hf = None
            self.eod_id = self._sp.eos_id()
            self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i != self.eod_id]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)


def load_sentencepiece(path: str | Path) -> Any:
    """A sentencepiece processor of the model file `path`, or a one-line ValueError naming it."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        raise ValueError(f"{path}: not a sentencepiece model") from None


def find_tokenizer(ckpt: Path, data_path: str | None, override: str | Path | None = None) -> Path:
    """--tokenizer, else one shipped in the checkpoint/weights dir, else the dataset's tokenizer.model."""
    if override is not None:
        if not Path(override).is_file():
            raise ValueError(f"--tokenizer {override}: no such file")
        return Path(override)
    candidates = [ckpt / SPM_NAME, ckpt / HF_TOKENIZER_NAME]
    if data_path:
        candidates.append(Path(data_path) / SPM_NAME)
    for c in candidates:
        if c.is_file():
            return c
    raise ValueError(f"{ckpt}: no tokenizer found (looked at {', '.join(str(c) for c in candidates)}); "
                     f"pass --tokenizer DATASET/tokenizer.model")


# ------------------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def check(self) -> Sampling:
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1] (1 = off)")
        return self


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token id from full-vocabulary logits [V]. Every TP rank holds the same logits and the same
    generator state, so every rank draws the same token without a broadcast."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


# ------------------------------------------------------------------------------------------------ decoding
def _batch_rows(model: torch.nn.Module) -> int:
    """Rows per forward: attention splits the b·H (sequence, head) pairs over the TP ranks, so when one
    sequence's heads do not split (12 heads at TP 8) the prompt is repeated to the smallest batch that does
    (row 0 is used)."""
    return model.tp.size // math.gcd(model.cfg.n_heads, model.tp.size)


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eod_id: int | None,
                 sampling: Sampling = Sampling(), use_cache: bool = True) -> list[int]:
    """Generated ids (not the prompt), ending at the first end-of-document id (included) or after
    `max_new_tokens`. Collective over the TP group: every TP rank calls with the same arguments."""
    if not prompt:
        raise ValueError("empty prompt: give at least one token of text")
    device = next(model.parameters()).device
    rows = _batch_rows(model)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    was_training = model.training
    model.eval()
    seq = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
    cache = KVCache(model.cfg.n_layers, len(prompt) + max_new_tokens) if use_cache else None
    out: list[int] = []
    step_input = seq
    for _ in range(max_new_tokens):
        logits = model.gather_logits(model(step_input, cache=cache) if use_cache else model(seq))
        token = next_token(logits[0, -1], sampling, generator)
        out.append(token)
        if token == eod_id:
            break
        step = torch.full((rows, 1), token, dtype=torch.long, device=device)
        seq = torch.cat([seq, step], dim=1)
        step_input = step
    model.train(was_training)
    return out


def main(argv: list[str] | None = None) -> int:
    from tokenformer_dist.checkpoint.engine import open_checkpoint
    from tokenformer_dist.cli import ArgumentParser, user_error
    from tokenformer_dist.inference import launch as tp_launch

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or weights dir (any TP, any ZeRO)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file holding the prompt text (UTF-8)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K most likely (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same tokens on every TP rank)")
    parser.add_argument("--tp", type=int, default=None, help="TP degree (plain python: 1; under torchrun, "
                                                             "default: the largest dividing N and the checkpoint's)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: found from the ckpt)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args(argv)
    launch = None
    try:
        if args.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be > 0")
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).check()
        ckpt, cfg, ckpt_tp = open_checkpoint(args.ckpt)
        tp = tp_launch.choose_tp(args.tp, ckpt_tp, cfg, tp_launch.launch_world_size())
        tokenizer = Tokenizer(find_tokenizer(ckpt, cfg.data.path, args.tokenizer))
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"{tokenizer.path}: vocabulary {tokenizer.vocab_size} is larger than the model's "
                             f"{cfg.model.vocab_size}; pass the dataset's --tokenizer")
        text = args.prompt if args.prompt is not None else args.prompt_file.read_text(encoding="utf-8")
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        if len(ids) + args.max_new_tokens > cfg.model.seq_len:
            print(f"note: {len(ids)} prompt + {args.max_new_tokens} new tokens run past the trained context of "
                  f"{cfg.model.seq_len} positions", file=sys.stderr)
        launch = tp_launch.start(tp, cfg)
        model = load_model(ckpt, launch.device, launch.tp_group)
        start = time.perf_counter()
        out = generate_ids(model, ids, args.max_new_tokens, tokenizer.eod_id, sampling,
                           use_cache=not args.no_cache)
        seconds = time.perf_counter() - start
    except (ValueError, OSError) as e:  # ConfigError and launch.LaunchError are ValueErrors
        tp_launch.finish(launch)
        return user_error(e)
    if launch.is_main:
        completion = tokenizer.decode(out)
        print(text + completion)
        if args.json:
            print(json.dumps({"text": completion, "tokens": out, "tokens_per_s": len(out) / max(seconds, 1e-9)}))
    tp_launch.finish(launch)
    return 0
