"""A local lm-evaluation-harness task built from a dataset's held-out text: "which continuation is the real one".

Each item is a context of `context_tokens` tokens from a val document and two continuations: the real next
`continuation_tokens` tokens, and the same words in a shuffled order. Both choices hold the same words, so
only a model that has learned something about word order prefers the real one; an untrained model is at
chance (0.5). No internet and no downloaded task data are needed, so it runs where lm-eval's registered
tasks (LAMBADA, HellaSwag, ...) cannot be fetched.

    write_continuation_task(data_dir, out_dir) -> out_dir/{tfd_continuation.yaml, tfd_continuation.jsonl}
    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True \
        --include_path out_dir --tasks tfd_continuation
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASK = "tfd_continuation"

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _spans(ids: list[int], length: int) -> list[int]:
    return list(range(0, len(ids) - length + 1, length))


def _shuffled(text: str, rng: random.Random) -> str | None:
    """The words of `text` (space-separated, leading space kept) in another order; None if impossible."""
    words = text.split(" ")
    lead, words = words[0], words[1:]
    if len(set(words)) < 2:
        return None
    order = words[:]
    while order == words:
        rng.shuffle(order)
    return " ".join([lead, *order])


def build_items(data_dir: str | Path, n_items: int = 64, context_tokens: int = 32,
                continuation_tokens: int = 16, seed: int = 0) -> list[dict]:
    """Items {"context", "choices", "label"} from the val split of a built dataset (text decoded with its
    own tokenizer, so it is the dataset's text)."""
    import sentencepiece as spm

    from tokenformer_dist.data import TokenShards

    shards = TokenShards(data_dir, "val")
    sp = spm.SentencePieceProcessor(model_file=str(Path(data_dir) / "tokenizer.model"))
    offsets = shards.doc_offsets()
    docs = [shards.tokens(int(a), int(b)).tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    window = context_tokens + continuation_tokens
    rng = random.Random(seed)
    items = []
    for doc in docs:
        doc = [t for t in doc if t != shards.eod_id]
        for start in range(0, len(doc) - window + 1, window):
            full = sp.decode(doc[start:start + window])
            context = sp.decode(doc[start:start + context_tokens])
            if not (full.startswith(context) and context.strip()):
                continue
            real = full[len(context):]
            fake = _shuffled(real, rng)
            if fake is None:
                continue
            label = rng.randrange(2)
            items.append({"context": context, "choices": [fake, real] if label else [real, fake], "label": label})
    rng.shuffle(items)
    if not items:
        raise ValueError(f"{data_dir}: the val split has no text span of {window} tokens with several words")
    return items[:n_items]


def write_continuation_task(data_dir: str | Path, out_dir: str | Path, **kwargs: int) -> Path:
    """Write the task's JSONL and YAML into out_dir (lm-eval's --include_path); returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = build_items(data_dir, **kwargs)
    jsonl = out / f"{TASK}.jsonl"
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in items))
    (out / f"{TASK}.yaml").write_text(YAML.format(task=TASK, jsonl=json.dumps(str(jsonl.resolve()))))
    return out
