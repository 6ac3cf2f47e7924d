"""transformers config of an exported TokenFormer: the fields of `ModelConfig`, plus the names transformers
and lm-eval read (hidden_size, num_hidden_layers, max_position_embeddings, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from tokenformer_dist.config import ModelConfig

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class TokenFormerConfig(PretrainedConfig):
    model_type = "tokenformer"

    def __init__(self, eod_id: int | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        defaults = ModelConfig()
        self.use_cache = use_cache
        for name in MODEL_FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        self.eod_id = eod_id
        # the names generic code reads (DynamicCache, lm-eval's max length, GenerationMixin)
        self.hidden_size, self.num_hidden_layers = self.d_model, self.n_layers
        self.num_attention_heads, self.max_position_embeddings = self.n_heads, self.seq_len
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            kwargs.pop(key, None)
        kwargs.setdefault("eos_token_id", eod_id)
        kwargs.setdefault("pad_token_id", eod_id)
        kwargs["tie_word_embeddings"] = False  # the model reuses its embedding itself; nothing for HF to tie
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})
