"""Text → token ids: the interface of ropo's two tokenizers, and which one a model directory gets.

First stage after the config: `data.py` turns every preference pair into prompt ids and response
ids through this interface; the built-in task trains its own tiny model with `train_tokenizer`.
  * spm_tokenizer.py reads a Llama-2 / Mistral sentencepiece `tokenizer.model` (the paper's
    models), with no Hugging Face code;
  * hf_tokenizer.py reads a `tokenizer.json` with Hugging Face's `tokenizers` library (SmolLM2,
    Llama-3, ...), giving the ids transformers' AutoTokenizer gives.
A directory with both (HF's Llama-2 and Mistral folders ship both) is read through tokenizer.model.

Two kinds of text come in (boundary.py has the rules): plain text, from a named template of
chat_templates.py or none, to which the tokenizer adds the BOS it uses and one EOS after the
response (`encode_prompt_response`); and text that a model's own chat template rendered with all
its special tokens, to which nothing is added (`encode_templated`). Either way the prompt's ids do
not depend on the response, and prompt ids + response ids are the ids of the whole text, except
where a token would span the boundary (boundary.split_after_prompt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ropo.models.files import require_regular_file
from ropo.models.hf_tokenizer import HFTokenizer
from ropo.models.spm_tokenizer import SentencePieceTokenizer, train_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer"]


class Tokenizer(Protocol):
    """What the rest of ropo reads from a tokenizer, whichever file it came from."""

    bos_id: int | None  # None: the model has no BOS token
    eos_id: int  # ends every response; the sampler stops at it
    pad_id: int  # the pad token, else EOS; padding is always masked, never detected by id
    adds_bos: bool  # whether plain text starts with a BOS id
    vocab_size: int  # ids are below this
    fingerprint: str  # sha256 of the tokenizer's files: other files, other ids
    model_file: Path  # tokenizer.model or tokenizer.json
    special_tokens: dict[str, str]  # bos_token, eos_token, ...: what chat templates read

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]: ...

    def encode_templated(self, prompt: str, response: str) -> tuple[list[int], list[int]]: ...


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of model directory `path` (tokenizer.model if it has one, else
    tokenizer.json); `path` may also be either file itself."""
    path = Path(path)
    if path.is_file():
        file, missing = path, ""
    else:
        spm_file, json_file = path / "tokenizer.model", path / "tokenizer.json"
        file = json_file if json_file.exists() and not spm_file.exists() else spm_file
        missing = f"tokenizer file {spm_file} does not exist (nor {json_file.name})"
    require_regular_file(file, missing)  # not a FIFO
    if file.name.endswith(".json"):
        return HFTokenizer(file)
    return SentencePieceTokenizer(file)
