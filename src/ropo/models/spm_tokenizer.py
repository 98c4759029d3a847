"""A Llama-2 / Mistral sentencepiece `tokenizer.model`; training a tiny one for the built-in task.

One of the two tokenizers behind tokenizer.py's interface (the other is hf_tokenizer.py). Plain text
gets the word-start continuation rule for the prompt/response boundary:
  * prompt ids = [BOS] + spm.encode(prompt), the markers "</s>" / "<s>" in the prompt as EOS / BOS
    ids with each following segment encoded on its own, as Meta's encoder does;
  * the response (joined as boundary.join_at_boundary says) is encoded without spm's dummy
    prefix, so no stray lone "▁" appears; "[/INST]" + "Paris" gives "▁Paris" after "]", as Meta's
    and mistral-common's chat encoders do. Response ids end with one EOS.
So decode(prompt_ids + response_ids) == prompt + sep + response, sep = " " only when neither side
has whitespace at the boundary.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from ropo.models.boundary import (
    BOS_TEXT,
    EOS_TEXT,
    TURN_MARKERS,
    check_no_leading_bos,
    join_at_boundary,
    split_after_prompt,
)

# Llama and Mistral have no "\n" piece, only the byte piece <0x0A>, so no token can span it:
# spm.encode("\n" + text) == spm.encode("\n") + (text encoded without the dummy prefix).
_SENTINEL = "\n"


class SentencePieceTokenizer:
    """Llama-style sentencepiece tokenizer. `pad_id` is spm's pad if defined, else EOS: padding is
    always paired with explicit masks, never detected as `ids != pad_id`."""

    def __init__(self, model_file: str | Path) -> None:
        model_file = Path(model_file)
        data = model_file.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as err:
            raise ValueError(f"{model_file}: not a sentencepiece model ({err})") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{model_file}: bos_id={self.bos_id}, eos_id={self.eos_id}; "
                "a Llama-style tokenizer needs both <s> and </s>"
            )
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.adds_bos = True  # every prompt starts with one BOS id
        self.vocab_size: int = self.sp.get_piece_size()
        # Part of the reference-cache key: a different tokenizer means different ids.
        self.fingerprint: str = hashlib.sha256(data).hexdigest()
        self.model_file = model_file
        self.special_tokens = self._special_tokens()
        self._sentinel_ids = self.sp.encode(_SENTINEL)
        self._sentinel_is_byte = bool(self._sentinel_ids) and self.sp.is_byte(
            self._sentinel_ids[-1]
        )

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, exactly as spm encodes it (with its dummy prefix); "<s>" in the text
        stays text. BOS/EOS ids are added when asked."""
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; BOS/EOS/pad render as nothing."""
        return self.sp.decode(list(ids))

    def encode_prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of plain text under the rule in the module docstring: the
        only BOS starts the prompt, exactly one EOS ends the response."""
        check_no_leading_bos(prompt)
        body, response = join_at_boundary(prompt, response)
        prompt_ids = [self.bos_id] + self._encode_with_markers(body)
        return prompt_ids, self._encode_continuation(response) + [self.eos_id]

    def encode_templated(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of text a model's chat template rendered: its "<s>" / "</s>"
        become BOS / EOS ids, each segment between them encoded as spm does (the HF Llama
        tokenizer's legacy behaviour); no id is added. See boundary.split_after_prompt."""
        prompt_ids = self._encode_with_markers(prompt)
        full_ids = self._encode_with_markers(prompt + response)
        encode_alone = lambda: self._encode_with_markers(response)  # noqa: E731
        return prompt_ids, split_after_prompt(prompt_ids, full_ids, encode_alone)

    def _special_tokens(self) -> dict[str, str]:
        """The pieces a chat template reads as bos_token, eos_token, unk_token and pad_token."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.sp.unk_id()}
        if self.sp.pad_id() >= 0:
            ids["pad_token"] = self.sp.pad_id()
        return {name: self.sp.id_to_piece(i) for name, i in ids.items() if i >= 0}

    def _encode_with_markers(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in TURN_MARKERS.split(text):
            if part == BOS_TEXT:
                ids.append(self.bos_id)
            elif part == EOS_TEXT:
                ids.append(self.eos_id)
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def _encode_continuation(self, text: str) -> list[int]:
        """`text` encoded without the dummy prefix: the torchtune-style sentinel trick."""
        if not text:
            return []
        n = len(self._sentinel_ids)
        ids = self.sp.encode(_SENTINEL + text)
        if not self._sentinel_is_byte or ids[:n] != self._sentinel_ids:
            raise ValueError(
                f"{self.model_file}: '\\n' is not a byte-fallback piece, so responses cannot be "
                "encoded as continuations; ropo expects a Llama/Mistral-style tokenizer.model"
            )
        return ids[n:]


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, seed: int = 0
) -> SentencePieceTokenizer:
    """Train a small Llama-style BPE model and write `out_dir`/tokenizer.model.

    Same settings as Llama-2 where they matter (unk=0, bos=1, eos=2, no pad, byte fallback, split
    digits, identity normalisation, spaces kept). Texts are split into lines, so "\\n" stays a byte
    piece as in Llama. Deterministic for the same texts and seed (one thread), and silent.
    """
    lines = list(_training_lines(texts))
    if not lines:
        raise ValueError("train_tokenizer: no non-blank text to train on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                logstream=quiet,
                minloglevel=2,
                vocab_size=vocab_size,
                model_type="bpe",
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                byte_fallback=True,
                split_digits=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=True,
                allow_whitespace_only_pieces=True,
                character_coverage=0.99995,
                hard_vocab_limit=False,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=1,
            )
        except RuntimeError as err:
            raise ValueError(f"train_tokenizer (vocab_size={vocab_size}): {err}") from None
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return SentencePieceTokenizer(out_dir / "tokenizer.model")


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from (line for line in text.splitlines() if line.strip())
