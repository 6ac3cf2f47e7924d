"""transformers wrapper of the project's single-device TokenFormer: the same module, the same state_dict names
(under `model.`), the same KV cache protocol (transformers' DynamicCache has the `update(k, v, layer_idx)` /
`get_seq_length()` methods the attention calls), so an exported folder computes exactly what the project's
model computes. The math is not restated here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tokenformer_dist.inference.hf.configuration_tokenformer import TokenFormerConfig
from tokenformer_dist.model.attention import Rotary
from tokenformer_dist.model.tokenformer import TokenFormer

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache` (generate() passes
# `cache=`); the model takes either name and returns the cache under whichever name this version's output has.
CACHE_OUTPUT_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class TokenFormerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TokenFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["TokenFormerBlock"]
    _supports_cache_class = True

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__(config)
        self.model = TokenFormer(config.model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight comes from model.safetensors; nothing is drawn here. The rotary frequencies are a
        non-persistent buffer (not in the file) that from_pretrained materializes empty: computed here, as
        transformers' own rotary models do."""
        if isinstance(module, Rotary):
            module.reset_constants()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Causal LM forward. Right padding only (what lm-eval and single-prompt generate() use): a left-padded
        `attention_mask` is refused rather than silently giving other positions."""
        if attention_mask is not None and attention_mask.shape[-1] > 1:
            left_pad = (attention_mask[:, :-1] < attention_mask[:, 1:]).any()
            if bool(left_pad):
                raise ValueError("attention_mask has left padding; this model supports right padding only")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        logits = self.model(input_ids, cache=cache if use_cache else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_OUTPUT_FIELD: cache if use_cache else None})
