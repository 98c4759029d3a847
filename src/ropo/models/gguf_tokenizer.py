"""A GGUF file's tokenizer metadata -> Hugging Face tokenizer files (gguf.py writes them).

llama.cpp keeps a byte-level BPE tokenizer as metadata: tokenizer.ggml.tokens (the vocabulary, in
GPT-2's byte alphabet), .merges ("a b" pairs, best first), .token_type (which tokens are special)
and .pre (how text is split before BPE). tokenizer_json rebuilds tokenizer.json from them; the
split for each supported `pre` is the one llama.cpp applies, so both give the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
# What llama.cpp splits text on before byte-level BPE, by tokenizer.ggml.pre. Each list runs before
# ByteLevel's own GPT-2 regex. llama.cpp (llama-vocab.cpp) gives smollm, starcoder and refact the
# same two expressions, "\p{N}" then GPT-2's regex: every digit on its own.
DIGITS = {"type": "Digits", "individual_digits": True}
PRE_TOKENIZER_SPLITS = {"gpt2": [], "smollm": [DIGITS], "starcoder": [DIGITS], "refact": [DIGITS]}
SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def tokenizer_json(metadata: dict[str, Any], source: Path) -> dict[str, Any]:
    """tokenizer.json (Hugging Face tokenizers' format) for the file's byte-level BPE vocabulary:
    llama.cpp's pre-tokenizer split, ByteLevel, BPE with the file's merges, ByteLevel decoding."""
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if model != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model!r}; convert-gguf supports 'gpt2' "
            "(byte-level BPE)"
        )
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre is {pre!r}; convert-gguf supports "
            f"{', '.join(PRE_TOKENIZER_SPLITS)}"
        )
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not metadata.get(key):
            raise ValueError(f"{source}: metadata field {key} is missing")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        raise ValueError(
            f"{source}: tokenizer.ggml.tokens has {len(tokens)} entries ({len(vocab)} distinct) "
            f"and tokenizer.ggml.token_type {len(types)}; expected as many, all distinct"
        )
    merges = [merge.split(" ") for merge in metadata["tokenizer.ggml.merges"]]
    bad = next((i for i, merge in enumerate(merges) if len(merge) != 2), None)
    if bad is not None:
        raise ValueError(f"{source}: tokenizer.ggml.merges[{bad}] is {merges[bad]!r}, not 'a b'")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            _added_token(i, token, special=kind != USER_DEFINED)
            for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
            if kind in (UNKNOWN, CONTROL, USER_DEFINED)  # matched whole in the text
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [*PRE_TOKENIZER_SPLITS[pre], _byte_level(False, trim_offsets=True)],
        },
        "post_processor": _post_processor(metadata, tokens),
        "decoder": _byte_level(True, trim_offsets=True),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,  # every byte has a token: nothing is unknown
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(
    metadata: dict[str, Any], tokenizer: dict[str, Any], model_max_length: int
) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens as text, BOS/EOS flags and the chat template."""
    tokens = metadata["tokenizer.ggml.tokens"]
    special = {name: tokens[metadata[key]] for name, key in SPECIAL_IDS.items() if key in metadata}
    template = metadata.get("tokenizer.chat_template")
    return {
        # The generic class loads tokenizer.json as written (transformers 4 and 5).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        **special,
        "added_tokens_decoder": {
            str(entry["id"]): {key: value for key, value in entry.items() if key != "id"}
            for entry in tokenizer["added_tokens"]
        },
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **({"chat_template": template} if template else {}),
    }


def generation_config(metadata: dict[str, Any]) -> dict[str, int]:
    """generation_config.json: the bos/eos/pad ids the file names."""
    ids = {
        name.replace("_token", "_token_id"): metadata.get(key) for name, key in SPECIAL_IDS.items()
    }
    return {name: i for name, i in ids.items() if i is not None and name != "unk_token_id"}


def _post_processor(metadata: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    # With add_bos_token / add_eos_token set, llama.cpp puts BOS before and EOS after the text.
    ends = {}  # "bos"/"eos" -> token id
    for end in ("bos", "eos"):
        token_id = metadata.get(f"tokenizer.ggml.{end}_token_id")
        if metadata.get(f"tokenizer.ggml.add_{end}_token") and token_id is not None:
            ends[end] = token_id
    if not ends:
        return _byte_level(True, trim_offsets=False)

    def around(sequence: str, type_id: int) -> list[dict[str, Any]]:
        text = [{"Sequence": {"id": sequence, "type_id": type_id}}]
        bos, eos = (
            [{"SpecialToken": {"id": tokens[ends[end]], "type_id": type_id}}] if end in ends else []
            for end in ("bos", "eos")
        )
        return bos + text + eos

    return {
        "type": "TemplateProcessing",
        "single": around("A", 0),
        "pair": around("A", 0) + around("B", 1),
        "special_tokens": {
            tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in ends.values()
        },
    }


def _byte_level(add_prefix_space: bool, trim_offsets: bool) -> dict[str, Any]:
    return {
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": True,  # GPT-2's split into words, numbers, punctuation and spaces
    }


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }
