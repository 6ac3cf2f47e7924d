"""transformers tokenizer over the dataset's sentencepiece model, encoding exactly as data_prep does.

`tokenize` is `sentencepiece.encode(text)` on the whole text: no BOS/EOS added, no splitting around special
tokens, no text normalization by transformers — so the ids are the ones the model was trained on and the
ones `tokenformer_dist.generate` feeds it. The end-of-document id is the EOS token.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES = {"vocab_file": "tokenizer.model"}


class TokenFormerTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("eos_token", self.sp.id_to_piece(self.sp.eos_id()))
        kwargs.setdefault("unk_token", self.sp.id_to_piece(self.sp.unk_id()))
        kwargs.setdefault("pad_token", kwargs["eos_token"])
        kwargs["special_tokens_pattern"] = "none"
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(tokens)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self.sp.decode(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        out = os.path.join(save_directory, prefix + VOCAB_FILES["vocab_file"])
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
