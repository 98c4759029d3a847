"""The files beside saved weights that make Hugging Face tools tokenise as the run trained.

`policy.save_final` (for `<out>/final`) and `checkpoint.py` (for every full checkpoint) call
write_tokenizer_files after the weights. Without them transformers' AutoTokenizer guesses, and
drops the BOS that every training sequence started with. `tokenizer_config.json` holds the chat
template of the run: the model's own (template=auto), or chat_templates.py's Jinja of the named
template, so that apply_chat_template renders the prompts the run trained on; a later template=auto
reads either back as it was.

A sentencepiece model gets tokenizer.model, tokenizer_config.json, special_tokens_map.json and
generation_config.json, written for transformers' LlamaTokenizer:
  * add_bos_token=true: every prompt starts with one BOS id.
  * add_eos_token=false: EOS ends each response, but a prompt to generate from has none; a
    trainer appends EOS after the response itself (as ropo and TRL do).
  * legacy=true: each text between special tokens gets sentencepiece's dummy prefix, as ropo
    encodes "</s><s>[INST]" (the "▁[INST]" of Meta's encoder); legacy=false would drop it.
  * model_max_length = the model's max_position_embeddings: what the network can attend over.
    The run's max_length is a data setting (run.json), and as model_max_length it would make
    `truncation=True` cut prompts at the training length.
  * generation_config.json holds only the bos/eos/pad ids, so greedy decoding is unchanged.
One known difference: transformers 5's LlamaTokenizer puts no extra "▁" before a text that
starts with a space (sentencepiece and transformers 4 do), so such a prompt gets one id fewer.

A tokenizer.json model gets its tokenizer.json, its own tokenizer_config.json with the run's chat
template, the special-token strings ropo read (also those found in special_tokens_map.json) and
model_max_length as above, and generation_config.json. Its tokenizer_class becomes
PreTrainedTokenizerFast, the class that reads tokenizer.json exactly as ropo does: transformers 5
rebuilds a model-specific class from the vocabulary (SmolLM2's GPT2Tokenizer loses the digit
split of its tokenizer.json, and "\n 4" becomes other ids).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropo.models.chat_format import ChatFormat
from ropo.models.chat_templates import jinja_template
from ropo.models.files import write_atomic
from ropo.models.hf_tokenizer import HFTokenizer
from ropo.models.spm_tokenizer import SentencePieceTokenizer
from ropo.models.tokenizer import Tokenizer

SPM_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@dataclass(frozen=True)
class TokenizerExport:
    """How a run turned text into ids: its tokenizer and the chat format of its pairs."""

    tokenizer: Tokenizer
    chat: ChatFormat

    @property
    def chat_template(self) -> str:
        """The Jinja for tokenizer_config.json: the model's own, or the named template's."""
        return self.chat.jinja or jinja_template(self.chat.template, self.tokenizer.adds_bos)


def tokenizer_files(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The names write_tokenizer_files writes for `tokenizer`."""
    return HF_FILES if isinstance(tokenizer, HFTokenizer) else SPM_FILES


def write_tokenizer_files(path: Path, export: TokenizerExport, model_max_length: int) -> None:
    """Write tokenizer_files(tokenizer) into the model directory `path` (each one atomically)."""
    tokenizer = export.tokenizer
    if isinstance(tokenizer, SentencePieceTokenizer):
        _write_spm_files(path, tokenizer, export.chat_template, model_max_length)
    else:
        _write_hf_files(path, tokenizer, export.chat_template, model_max_length)
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    _write_json(path / "generation_config.json", generation)


def _write_spm_files(
    path: Path, tokenizer: SentencePieceTokenizer, chat_template: str, model_max_length: int
) -> None:
    """tokenizer.model with the LlamaTokenizer settings of the module docstring."""
    special = special_tokens(tokenizer)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        **{name: token["content"] for name, token in special.items()},
        "added_tokens_decoder": added_tokens(tokenizer),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode as sentencepiece does
        "chat_template": chat_template,
    }
    _copy_file(tokenizer.model_file, path / "tokenizer.model")
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", special)


def _write_hf_files(
    path: Path, tokenizer: HFTokenizer, chat_template: str, model_max_length: int
) -> None:
    """tokenizer.json and the model's own tokenizer_config.json, changed as the module says."""
    config = tokenizer.config | tokenizer.special_tokens
    config |= {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
    _copy_file(tokenizer.model_file, path / "tokenizer.json")
    _write_json(path / "tokenizer_config.json", config)


def special_tokens(tokenizer: SentencePieceTokenizer) -> dict[str, dict[str, Any]]:
    """bos/eos/unk/pad token entries as special_tokens_map.json holds them; pad is ropo's pad
    (sentencepiece's pad piece, else EOS: padding is always masked)."""
    ids = {
        "bos_token": tokenizer.bos_id,
        "eos_token": tokenizer.eos_id,
        "unk_token": tokenizer.sp.unk_id(),
        "pad_token": tokenizer.pad_id,
    }
    return {name: _token_entry(tokenizer, i) for name, i in ids.items()}


def added_tokens(tokenizer: SentencePieceTokenizer) -> dict[str, dict[str, Any]]:
    """{id: entry} for every special piece. `normalized: false` matches "</s>" in the raw text,
    so the text after it starts a new piece with its own dummy prefix, as in ropo's encoder."""
    ids = sorted({tokenizer.bos_id, tokenizer.eos_id, tokenizer.sp.unk_id(), tokenizer.pad_id})
    return {str(i): _token_entry(tokenizer, i) | {"special": True} for i in ids}


def _token_entry(tokenizer: SentencePieceTokenizer, token_id: int) -> dict[str, Any]:
    return {
        "content": tokenizer.sp.id_to_piece(token_id),
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _copy_file(source: Path, target: Path) -> None:
    write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))


def _write_json(target: Path, data: dict) -> None:
    write_atomic(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
