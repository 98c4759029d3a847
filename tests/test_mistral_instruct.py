"""The mistral-instruct template against mistral-common, Mistral's own chat encoder, on the
Mistral-7B v0.1/v0.2 tokenizer.model that mistral-common ships: prompt ids and prompt + response
ids equal, with system text, several turns, whitespace at either end, unicode and code blocks.
"""

import warnings
from pathlib import Path

import pytest

from ropo.models.chat_format import ChatFormat
from ropo.models.chat_templates import format_chat
from ropo.models.spm_tokenizer import SentencePieceTokenizer as Tokenizer
from ropo.models.tokenizer import load_tokenizer

SYSTEM_TEXT = {"role": "system", "content": "Answer briefly.\n"}
MISTRAL_CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [SYSTEM_TEXT, {"role": "user", "content": " café, 東京 and 😀? "}],
    [
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "  and now?\n"},
    ],
    [
        SYSTEM_TEXT,
        {"role": "user", "content": "Fix this:\n```python\ndef f(x):\n\treturn x+1\n```"},
        {"role": "assistant", "content": "```python\ndef f(x):\n    return x + 1\n```\n"},
        {"role": "user", "content": "\nThanks. And 12345 * 3.14159?"},
    ],
]
MISTRAL_ANSWERS = ["Paris", " Paris ", "\nParis", "\tParis.", "  two spaces", "Ünïcödé 東京 😀",
                   "```python\nprint(1)\n```\n", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def mistral() -> tuple[object, Tokenizer]:
    """(mistral-common's v1 tokenizer, ropo's tokenizer) over Mistral-7B v0.1/v0.2's
    tokenizer.model, which mistral-common ships."""
    mistral_common = pytest.importorskip("mistral_common")
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    model_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    ours = load_tokenizer(model_file)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (32000, 1, 2)  # Mistral-7B's
    return MistralTokenizer.from_file(str(model_file)), ours


def mistral_common_ids(reference: object, messages: list[dict], answer: str | None) -> list[int]:
    """mistral-common's ids of the conversation; with `answer`, of the conversation that ends
    with that answer, not closed (AssistantMessage prefix=True: no EOS after it)."""
    from mistral_common.protocol.instruct import messages as mc
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": mc.SystemMessage, "user": mc.UserMessage, "assistant": mc.AssistantMessage}
    turns = [kinds[m["role"]](content=m["content"]) for m in messages]
    if answer is not None:
        turns.append(mc.AssistantMessage(content=answer, prefix=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return reference.encode_chat_completion(ChatCompletionRequest(messages=turns)).tokens


@pytest.mark.parametrize("messages", MISTRAL_CONVERSATIONS)
def test_mistral_instruct_matches_mistral_common(
    mistral: tuple[object, Tokenizer], messages: list[dict]
) -> None:
    """Prompt ids, and prompt + response ids up to the EOS, are mistral-common's: system text,
    multi-turn, whitespace at either end of a turn or answer, unicode and code blocks."""
    reference, ours = mistral
    chat = ChatFormat("mistral-instruct")
    prompt = chat.prompt(messages)
    for answer in MISTRAL_ANSWERS:
        prompt_ids, response_ids = chat.encode(ours, prompt, chat.response(messages, answer))
        assert prompt_ids == mistral_common_ids(reference, messages, None), answer
        assert prompt_ids + response_ids[:-1] == mistral_common_ids(reference, messages, answer)
        assert response_ids[-1] == ours.eos_id


def test_mistral_answers_get_mistral_commons_dummy_prefix(
    mistral: tuple[object, Tokenizer],
) -> None:
    """Why format_response starts a mistral-instruct answer with a space: mistral-common encodes
    every answer on its own, so " Paris" gets "▁▁Paris", where the boundary rule alone gives
    "▁Paris"."""
    reference, ours = mistral
    messages = MISTRAL_CONVERSATIONS[0]
    prompt = format_chat(messages, "mistral-instruct")
    unprefixed = sum(ours.encode_prompt_response(prompt, " Paris"), [])[:-1]
    expected = mistral_common_ids(reference, messages, " Paris")
    assert unprefixed != expected
    assert [ours.sp.id_to_piece(i) for i in expected[-2:]] == ["▁", "▁Paris"]
