"""Sentencepiece tokenizer: spm parity, Llama special ids, the prompt/response boundary rule, the
named chat templates (test_mistral_instruct.py checks mistral-instruct against mistral-common),
and which file a model directory is read through.

Pitfalls C2 items 12-14: ids 0/1/2 and pad fallback, no lone dummy-prefix "▁" at the response
start, exactly one BOS and one EOS, no literal "<s>" in templated text.
"""

import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from ropo.models.chat_templates import format_chat
from ropo.models.hf_tokenizer import HFTokenizer
from ropo.models.spm_tokenizer import SentencePieceTokenizer as Tokenizer
from ropo.models.tokenizer import load_tokenizer, train_tokenizer
from tokenizer_fixtures import corpus, smollm2_like, tiny_tokenizer

STRINGS = [
    "",
    "hello world",
    " leading space",
    "trailing space ",
    "double  space",
    "   three leading",
    "line one\nline two\n",
    "\n\nstarts with newlines",
    "tab\tseparated\tvalues",
    "café naïve résumé Straße",
    "東京 北京市 こんにちは",
    "emoji 😀🚀 mixed",
    "Привет мир, مرحبا",
    "digits 12345 and 3.14159",
    "[INST] <<SYS>>\nsystem\n<</SYS>>\n\nhi [/INST]",
    "<s>literal markers stay text</s>",
    "unseen chars: ☃ ∑ ॐ",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sp(tok: Tokenizer) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tok.model_file))


def pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.sp.id_to_piece(i) for i in ids]


def test_llama_special_ids(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id  # the model has no pad piece, as in Llama-2
    assert tok.vocab_size == sp.get_piece_size() == 500
    assert tok.sp.is_byte(tok.encode("\n")[-1])  # newline is <0x0A>, never a merged piece


def test_pad_is_spm_pad_when_defined(tmp_path: Path) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(100)), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=400, pad_id=3, byte_fallback=True, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    assert load_tokenizer(tmp_path).pad_id == 3


@pytest.mark.parametrize("text", STRINGS)
def test_encode_equals_sentencepiece(tok: Tokenizer, sp: spm.SentencePieceProcessor, text: str):
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [1] + sp.encode(text) + [2]
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_train_is_deterministic_and_quiet(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    tiny_tokenizer(tmp_path / "a")
    tiny_tokenizer(tmp_path / "b")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (
        tmp_path / "b/tokenizer.model"
    ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tokenizer.model"]


def test_train_rejects_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no non-blank text"):
        train_tokenizer(["", "  \n"], tmp_path, vocab_size=300)


def test_load_tokenizer_errors(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'tokenizer.model'} .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tok.model_file).encode("hello") == tok.encode("hello")  # a file path


# (prompt, response, separator the boundary rule puts between them)
BOUNDARIES = [
    ("Question: what is the capital of France?", "Paris is the capital", " "),
    ("[INST] hello [/INST]", "Paris.", " "),
    ("TL;DR:", " my friend reads", ""),
    ("Answer:", "\nI think", ""),
    ("Answer:\n", "I think", ""),
    ("Answer: ", "I think", ""),  # the prompt's trailing space moves to the response
    ("東京", "😀 ok", " "),
    ("tabs", "\tthe fox", ""),
]


@pytest.mark.parametrize(("prompt", "response", "sep"), BOUNDARIES)
def test_prompt_response_boundary(
    tok: Tokenizer, sp: spm.SentencePieceProcessor, prompt: str, response: str, sep: str
) -> None:
    prompt_ids, response_ids = tok.encode_prompt_response(prompt, response)
    assert prompt_ids[0] == tok.bos_id and tok.bos_id not in prompt_ids[1:] + response_ids
    assert response_ids[-1] == tok.eos_id and tok.eos_id not in prompt_ids + response_ids[:-1]
    assert tok.decode(prompt_ids + response_ids) == prompt + sep + response
    # Whitespace (or the joining space) at the boundary starts a new spm word, so encoding the two
    # halves separately gives exactly the ids of the joined text.
    assert prompt_ids[1:] + response_ids[:-1] == sp.encode(prompt + sep + response)
    assert prompt_ids == tok.encode_prompt_response(prompt, "something else entirely")[0]


@pytest.mark.parametrize("response", ["\nParis", " Paris", "\tParis"])
def test_no_lone_dummy_prefix_at_response_start(tok: Tokenizer, response: str) -> None:
    lone = tok.sp.piece_to_id("▁")
    assert tok.encode(response)[0] == lone  # the pitfall: a naive encode adds "▁" before " "/"\n"
    prompt_ids, response_ids = tok.encode_prompt_response("Answer:", response)
    assert response_ids[0] != lone
    assert tok.decode(prompt_ids + response_ids) == "Answer:" + response


def test_word_start_response_matches_plain_encode(tok: Tokenizer) -> None:
    # Meta's and mistral-common's chat encoders tokenise the answer alone: "▁Paris", not "Paris".
    _, response_ids = tok.encode_prompt_response("[INST] hi [/INST]", "Paris is the capital")
    assert response_ids[:-1] == tok.encode("Paris is the capital")
    assert pieces(tok, response_ids)[0] == "▁Paris"


def test_empty_response_is_only_eos(tok: Tokenizer) -> None:
    assert tok.encode_prompt_response("hello", "")[1] == [tok.eos_id]


def test_literal_bos_at_prompt_start_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="second BOS"):
        tok.encode_prompt_response("<s>[INST] hi [/INST]", "ok")


SYSTEM = {"role": "system", "content": "Be brief."}
HI = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello!"}
ASK = {"role": "user", "content": "What is 2+2?"}

GOLDEN = [
    ("llama2-chat", [ASK], "[INST] What is 2+2? [/INST]"),
    ("llama2-chat", [SYSTEM, ASK], "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]"),
    (
        "llama2-chat",
        [SYSTEM, HI, HELLO, ASK],
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>"
        "[INST] What is 2+2? [/INST]",
    ),
    ("mistral-instruct", [ASK], "[INST] What is 2+2? [/INST]"),
    ("mistral-instruct", [SYSTEM, ASK], "[INST] Be brief.\n\nWhat is 2+2? [/INST]"),
    (
        "mistral-instruct",
        [HI, HELLO, ASK],
        "[INST] Hi [/INST] Hello!</s>[INST] What is 2+2? [/INST]",
    ),
    ("plain", [ASK], "What is 2+2?"),
    (
        "plain",
        [SYSTEM, HI, HELLO, ASK],
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: What is 2+2?\n\nAssistant:",
    ),
]


@pytest.mark.parametrize(("template", "messages", "expected"), GOLDEN)
def test_chat_template_golden(tok: Tokenizer, template: str, messages: list, expected: str) -> None:
    text = format_chat(messages, template)
    assert text == expected
    prompt_ids, _ = tok.encode_prompt_response(text, "Four.")
    assert prompt_ids[0] == tok.bos_id and prompt_ids[1] != tok.bos_id  # one leading BOS
    assert tok.sp.piece_to_id("<0x3C>") not in prompt_ids  # no "<" byte: no literal "<s>" text


def test_llama2_multi_turn_ids_match_meta_encoding(tok: Tokenizer) -> None:
    # Meta's chat_completion: encode(f"[INST] {u} [/INST] {a} ", bos, eos) per finished turn.
    text = format_chat([SYSTEM, HI, HELLO, ASK], "llama2-chat")
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! "
    expected = [1] + tok.encode(first) + [2, 1] + tok.encode("[INST] What is 2+2? [/INST]")
    assert tok.encode_prompt_response(text, "4")[0] == expected


def test_mistral_multi_turn_ids_match_mistral_common(tok: Tokenizer) -> None:
    # mistral-common v1: [BOS] enc("[INST] u [/INST]") enc(a) [EOS] enc("[INST] u2 [/INST]").
    text = format_chat([HI, HELLO, ASK], "mistral-instruct")
    ids = tok.encode_prompt_response(text, "4")[0]
    expected = (
        [1]
        + tok.encode("[INST] Hi [/INST] Hello!")
        + [2]
        + tok.encode("[INST] What is 2+2? [/INST]")
    )
    assert ids == expected
    assert ids.count(tok.bos_id) == 1


@pytest.mark.parametrize(
    ("messages", "template", "match"),
    [
        ([], "plain", "at least one message"),
        ([ASK, HELLO], "plain", "must end with a user turn"),
        ([HI, ASK], "llama2-chat", r"messages\[1\]: role 'user', expected 'assistant'"),
        ([HELLO], "plain", r"messages\[0\]: role 'assistant', expected 'user'"),
        ([{"role": "user"}], "plain", "string 'content'"),
        ([ASK], "chatml", "unknown chat template"),
    ],
)
def test_chat_template_errors(messages: list, template: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_chat(messages, template)


# Runs of spaces are left out: HF's BPE over "▁▁word" may merge differently from spm's split.
ORACLE_STRINGS = ["hello world", "trailing ", "a\nb\n", "café 東京 😀", "12345", "tab\tx"]


def test_ids_match_transformers_llama_tokenizer(tok: Tokenizer, tmp_path: Path) -> None:
    """Oracle check; needs protobuf for transformers' spm conversion, so skipped without it."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.model").write_bytes(tok.model_file.read_bytes())
    try:
        hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=False)
    except (ImportError, OSError, ValueError) as err:
        pytest.skip(f"transformers cannot build LlamaTokenizer offline: {err}")
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in ORACLE_STRINGS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_which_file_a_model_directory_is_read_through(tmp_path: Path, tok: Tokenizer) -> None:
    """tokenizer.json alone: `tokenizers`; beside a tokenizer.model (HF's Llama-2 and Mistral
    folders ship both): sentencepiece, the tokenizer of the paper's models."""
    both = smollm2_like(tmp_path / "both")
    assert isinstance(load_tokenizer(both), HFTokenizer)
    shutil.copy(tok.model_file, both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), Tokenizer)
    assert isinstance(load_tokenizer(both / "tokenizer.json"), HFTokenizer)  # a file: that file
    assert load_tokenizer(both).encode("hello world") == tok.encode("hello world")
