"""Text → token ids: a thin wrapper over a Llama-2 / Mistral sentencepiece `tokenizer.model`.

First stage after the config: `data.py` calls `encode_prompt_response` for every preference
pair; the built-in task trains its own tiny model with `train_tokenizer`. No Hugging Face code.

Prompt/response boundary rule ("word-start continuation"), used for every pair:
  * prompt ids = [BOS] + spm.encode(prompt); trailing spaces of the prompt move to the response,
    so the prompt never ends in a lone "▁" and its ids depend on the prompt alone;
  * the response joins the prompt with exactly one space, unless the text already has whitespace
    at the boundary; it is encoded without spm's dummy prefix, so no stray lone "▁" appears;
  * response ids end with one EOS. So decode(prompt_ids + response_ids) == prompt + sep + response,
    sep = " " only when neither side has whitespace at the boundary. "[/INST]" + "Paris" gives
    "▁Paris" after "]", as Meta's and mistral-common's chat encoders do.
"""

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from ropo.models.files import require_regular_file

BOS_TEXT = "<s>"
EOS_TEXT = "</s>"
TEMPLATES = ("llama2-chat", "mistral-instruct", "plain")

# Llama and Mistral have no "\n" piece, only the byte piece <0x0A>, so no token can span it:
# spm.encode("\n" + text) == spm.encode("\n") + (text encoded without the dummy prefix).
_SENTINEL = "\n"
_TURN_MARKERS = re.compile(f"({re.escape(BOS_TEXT)}|{re.escape(EOS_TEXT)})")


class Tokenizer:
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
        self.vocab_size: int = self.sp.get_piece_size()
        # Part of the reference-cache key: a different tokenizer means different ids.
        self.fingerprint: str = hashlib.sha256(data).hexdigest()
        self.model_file = model_file
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
        """(prompt ids, response ids) under the boundary rule in the module docstring.

        Prompt ids start with the only leading BOS; the literal markers "</s>" and "<s>" inside the
        prompt (written between turns by `format_chat`, and parsed as specials by HF tokenizers too)
        become EOS/BOS ids, each following segment encoded on its own as Meta's encoder does.
        The response is plain text and always ends with exactly one EOS.
        """
        if prompt.startswith(BOS_TEXT):
            raise ValueError(
                f"prompt starts with a literal {BOS_TEXT!r}: BOS is added as an id, so this "
                f"would give a second BOS; remove it from the text (prompt: {prompt[:40]!r})"
            )
        body = prompt.rstrip(" ")
        response = prompt[len(body) :] + response
        prompt_ids = [self.bos_id] + self._encode_with_markers(body)
        needs_space = response != "" and not (body[-1:].isspace() or response[:1].isspace())
        response_ids = self._encode_continuation(" " * needs_space + response)
        return prompt_ids, response_ids + [self.eos_id]

    def _encode_with_markers(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _TURN_MARKERS.split(text):
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in `path`/tokenizer.model (`path` may also be the .model file itself)."""
    path = Path(path)
    model_file = path if path.is_file() else path / "tokenizer.model"
    require_regular_file(model_file, f"tokenizer file {model_file} does not exist")  # not a FIFO
    return Tokenizer(model_file)


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, seed: int = 0
) -> Tokenizer:
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
    return Tokenizer(out_dir / "tokenizer.model")


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from (line for line in text.splitlines() if line.strip())


def format_chat(messages: list[dict], template: str) -> str:
    """The prompt text of a conversation that ends with a user turn (the response is not included).

    `messages`: [{"role", "content"}], an optional leading "system", then user/assistant turns.
    The leading BOS is never written (it is added as an id). Between turns the text carries the
    literal markers "</s><s>" (llama2-chat) or "</s>" (mistral-instruct) where Meta's and
    mistral-common's encoders put EOS/BOS ids; `Tokenizer.encode_prompt_response` maps them to
    those ids. llama2-chat strips each turn as Meta's encoder does; mistral-instruct keeps text
    verbatim; "plain" renders a lone user turn verbatim, anything longer as a User:/Assistant:
    transcript.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
    system, users, assistants = _split_turns(messages)
    if template == "llama2-chat":
        if system is not None:  # Meta folds the system prompt into the first user turn
            users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
        turns = [
            f"[INST] {u.strip()} [/INST] {a.strip()} {EOS_TEXT}{BOS_TEXT}"
            for u, a in zip(users, assistants, strict=False)
        ]
        return "".join(turns) + f"[INST] {users[-1].strip()} [/INST]"
    if template == "mistral-instruct":
        if system is not None:  # v0.1/v0.2 have no system role; HF's template prepends it
            users[0] = f"{system}\n\n{users[0]}"
        turns = [
            f"[INST] {u} [/INST] {a}{EOS_TEXT}" for u, a in zip(users, assistants, strict=False)
        ]
        return "".join(turns) + f"[INST] {users[-1]} [/INST]"
    if system is None and len(users) == 1:
        return users[0]
    lines = [] if system is None else [f"System: {system}"]
    for u, a in zip(users, assistants, strict=False):
        lines += [f"User: {u}", f"Assistant: {a}"]
    return "\n\n".join(lines + [f"User: {users[-1]}", "Assistant:"])


def _split_turns(messages: list[dict]) -> tuple[str | None, list[str], list[str]]:
    """(system or None, user contents, assistant contents); roles must alternate, ending on user."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'content'")
    roles = [m.get("role") for m in messages]
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            raise ValueError(f"messages[{i}]: role {roles[i]!r}, expected {expected!r}")
    if roles[-1] != "user":
        raise ValueError("the conversation must end with a user turn (the response is not in it)")
    contents = [m["content"] for m in messages[start:]]
    system = messages[0]["content"] if start else None
    return system, contents[0::2], contents[1::2]
