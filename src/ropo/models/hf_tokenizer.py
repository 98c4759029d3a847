"""A `tokenizer.json` model, read with Hugging Face `tokenizers`: byte-level BPE (SmolLM2, Llama-3).

One of the two tokenizers behind tokenizer.py's interface (the other is spm_tokenizer.py). It gives
the ids transformers' AutoTokenizer gives for the same directory:
  * the text is split by tokenizer.json itself, special tokens in the text parsed as specials;
  * bos/eos/pad/unk... are the strings of tokenizer_config.json (or special_tokens_map.json), which
    may be written as AddedToken objects; missing bos/eos/pad ids come from generation_config.json
    or config.json; pad falls back to EOS (padding is always masked);
  * whether a BOS starts a text is the tokenizer.json post-processor's choice (Llama-3's adds
    <|begin_of_text|>, SmolLM2's nothing). add_bos_token / add_eos_token in tokenizer_config.json
    do not change it: transformers 5 drops them when there is a tokenizer.json (transformers 4's
    Llama class rebuilt the post-processor from them; shipped configs agree with their files).
Plain text follows boundary.py's rule (trailing prompt spaces move to the response, one joining
space, EOS after the response), with "<s>" / "</s>" in a prompt standing for the BOS / EOS token.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from ropo.models.boundary import (
    BOS_TEXT,
    EOS_TEXT,
    check_no_leading_bos,
    join_at_boundary,
    split_after_prompt,
)
from ropo.models.files import read_json

# The special tokens transformers passes to chat templates by name (special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip


class HFTokenizer:
    """The tokenizer of `tokenizer_file` (a tokenizer.json) and the files beside it."""

    def __init__(self, tokenizer_file: str | Path) -> None:
        self.model_file = Path(tokenizer_file)
        model_dir = self.model_file.parent
        data = self.model_file.read_bytes()
        try:
            self.backend = Backend.from_str(data.decode("utf-8"))
        except Exception as err:  # the Rust side raises plain Exception for every parse error
            raise ValueError(f"{self.model_file}: not a tokenizer.json ({err})") from None
        self.config = _read_optional(model_dir / "tokenizer_config.json")
        self.special_tokens = special_token_texts(model_dir, self.config)
        self.bos_id: int | None = self._special_id("bos_token")
        eos_id = self._special_id("eos_token")
        if eos_id is None:
            raise ValueError(
                f"{model_dir}: no EOS token (no eos_token in tokenizer_config.json, no "
                "eos_token_id in generation_config.json or config.json); ropo ends every "
                "response with it"
            )
        self.eos_id: int = eos_id
        pad_id = self._special_id("pad_token")
        self.pad_id: int = self.eos_id if pad_id is None else pad_id
        self._prefix = self._ids_before_text()
        self.adds_bos = self._prefix == [self.bos_id]
        if self._prefix and not self.adds_bos:
            raise ValueError(
                f"{self.model_file}: its post-processor puts {self._prefix} before every text, "
                f"not the BOS id {self.bos_id}; ropo handles tokenizers that add a BOS or nothing"
            )
        self.vocab_size: int = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
        config_bytes = repr(sorted(self.config.items())).encode()
        self.fingerprint: str = hashlib.sha256(data + config_bytes).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, special tokens in it parsed as specials (as transformers does),
        nothing added unless asked for BOS/EOS ids."""
        if bos and self.bos_id is None:
            raise ValueError(f"{self.model_file}: this tokenizer has no BOS token")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS, a template's turn tokens) render as nothing."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def encode_prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of plain text: the BOS this tokenizer adds (if any), the
        prompt, then the response joined as boundary.join_at_boundary says, and one EOS."""
        check_no_leading_bos(prompt)
        body, response = join_at_boundary(prompt, response)
        body = self._markers_as_tokens(body)
        body_ids = self.encode(body)
        full_ids = self.encode(body + response)
        response_ids = split_after_prompt(body_ids, full_ids, lambda: self.encode(response))
        return self._prefix + body_ids, response_ids + [self.eos_id]

    def encode_templated(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of text a model's chat template rendered, tokenised as
        transformers' apply_chat_template does: specials parsed, none added."""
        prompt_ids = self.encode(prompt)
        full_ids = self.encode(prompt + response)
        return prompt_ids, split_after_prompt(prompt_ids, full_ids, lambda: self.encode(response))

    def _special_id(self, name: str) -> int | None:
        """The id of special token `name`: its string's, else `<name>_id` of the config files."""
        text = self.special_tokens.get(name)
        if text is None:
            return _config_id(self.model_file.parent, f"{name}_id")
        token_id = self.backend.token_to_id(text)
        if token_id is None:
            raise ValueError(
                f"{self.model_file.parent}/tokenizer_config.json: {name} {text!r} is not in the "
                f"vocabulary of {self.model_file}"
            )
        return token_id

    def _ids_before_text(self) -> list[int]:
        """The ids the post-processor puts before every text (a BOS, or nothing)."""
        encoding = self.backend.encode("a", add_special_tokens=True)
        return encoding.ids[: encoding.special_tokens_mask.index(0)]

    def _markers_as_tokens(self, text: str) -> str:
        """`text` with the markers of the named templates spelled as this tokenizer's BOS / EOS."""
        bos = "" if self.bos_id is None else self.backend.id_to_token(self.bos_id)
        eos = self.backend.id_to_token(self.eos_id)
        return text.replace(EOS_TEXT, eos).replace(BOS_TEXT, bos)


def special_token_texts(model_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """{name: string} of the named special tokens, from tokenizer_config.json and, for names it
    lacks, special_tokens_map.json (older directories); an AddedToken object gives its content."""
    legacy = _read_optional(model_dir / "special_tokens_map.json")
    texts = {}
    for name in SPECIAL_TOKEN_NAMES:
        source = "tokenizer_config.json" if name in config else "special_tokens_map.json"
        value = config.get(name, legacy.get(name))
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{model_dir / source}: {name} must be a string or an AddedToken")
        texts[name] = value
    return texts


def _config_id(model_dir: Path, key: str) -> int | None:
    """`key` (e.g. "eos_token_id") of generation_config.json, else config.json; a list's first."""
    for name in ("generation_config.json", "config.json"):
        value = _read_optional(model_dir / name).get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _read_optional(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.exists():
        return {}
    value = read_json(path, f"{path} does not exist")
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value
