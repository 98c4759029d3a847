"""Data: the four JSONL formats, file:line errors, counted skips, truncation, ids, label noise.

Pitfalls C3 item 20: pairs with no room for a response, or whose responses become identical after
truncation, are skipped and counted, never trained on.
"""

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from ropo.data import (
    DataReport,
    PreferencePair,
    TokenizedPair,
    inject_noise,
    load_pairs,
    tokenize_pairs,
    write_pairs_jsonl,
)
from ropo.models.chat_format import ChatFormat
from ropo.models.tokenizer import Tokenizer
from tokenizer_fixtures import tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path: Path, lines: list) -> Path:
    """One line per item: dicts/lists as JSON, str as is, bytes raw (for bad UTF-8)."""
    data = b""
    for line in lines:
        if isinstance(line, bytes):
            data += line + b"\n"
        elif isinstance(line, str):
            data += line.encode() + b"\n"
        else:
            data += json.dumps(line, ensure_ascii=False).encode() + b"\n"
    path.write_bytes(data)
    return path


def sha_id(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha1(f"{prompt}\0{chosen}\0{rejected}".encode()).hexdigest()[:16]


GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def test_plain_strings_ids_and_sources(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            GOOD,
            "",
            {"prompt": "Say hi\nin French", "chosen": "Salut 😀", "rejected": "Hi", "id": 7},
        ],
    )
    pairs, report = load_pairs(path)
    assert pairs == [
        PreferencePair(sha_id("What is 2+2?", "4", "5"), "What is 2+2?", "4", "5", f"{path}:1"),
        PreferencePair("7", "Say hi\nin French", "Salut 😀", "Hi", f"{path}:3"),  # blank line 2
    ]
    assert (report.read, report.used, report.skipped) == (2, 2, {})
    assert [p.id for p in load_pairs(path)[0]] == [p.id for p in pairs]  # stable across runs


def test_plain_chat_messages(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Capital of France?"}
    lines = [
        {  # full conversations: the shared turns before the final assistant message are the prompt
            "chosen": [system, user, {"role": "assistant", "content": "Paris"}],
            "rejected": [system, user, {"role": "assistant", "content": "Lyon"}],
        },
        {  # TRL conversational layout: prompt messages apart, responses alone
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Rome."}],
        },
        {  # a string prompt is one user turn
            "prompt": "Capital of Italy?",
            "chosen": [{"role": "assistant", "content": "Rome"}],
            "rejected": [{"role": "assistant", "content": "Milan"}],
        },
    ]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "c.jsonl", lines), chat=ChatFormat("llama2-chat"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCapital of France? [/INST]", "Paris", "Lyon"),
        ("[INST] Capital of France? [/INST]", "Paris.", "Rome."),
        ("[INST] Capital of Italy? [/INST]", "Rome", "Milan"),
    ]


def uf_row(prompt_id: str, chosen: str, rejected: str, prompt: str = "Name a fruit.") -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "prompt_id": prompt_id,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def test_ultrafeedback_ids_repeats_and_duplicates(tmp_path: Path) -> None:
    rows = [
        uf_row("a1", "Apple", "Car"),
        uf_row("a1", "Pear", "Bus"),  # same prompt_id, other responses: kept as "a1#2"
        uf_row("a1", "Apple", "Car"),  # exact repeat: skipped, not merged silently
        uf_row("b2", "Kiwi", "Kiwi"),
    ]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    pairs, report = load_pairs(path, "ultrafeedback", ChatFormat("mistral-instruct"))
    assert [(p.id, p.prompt, p.chosen) for p in pairs] == [  # answers after a space, as Mistral's
        ("a1", "[INST] Name a fruit. [/INST]", " Apple"),
        ("a1#2", "[INST] Name a fruit. [/INST]", " Pear"),
    ]
    assert report.skipped == {"duplicate_pair": 1, "identical_responses": 1}
    assert report.summary() == (
        "read 4 pairs, used 2, skipped 2 (duplicate_pair: 1, identical_responses: 1)"
    )


def test_alpaca_comparison(tmp_path: Path) -> None:
    rows = [
        {
            "instruction": "Add.",
            "input": "2 and 2",
            "output_1": "4",
            "output_2": "5",
            "preference": 1,
        },
        {
            "instruction": "Greet.",
            "input": "",
            "output_1": "Bye",
            "output_2": "Hi",
            "preference": 2,
        },
    ]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca_comparison")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Add.\n\n2 and 2", "4", "5"),
        ("Greet.", "Hi", "Bye"),
    ]


def test_tldr(tmp_path: Path) -> None:
    info = {"id": "t3_x", "post": "My cat ate my homework.", "title": "Help", "subreddit": "cats"}
    row = {"info": info, "summaries": [{"text": " cat ate it"}, {"text": " dog did"}], "choice": 1}
    pairs, _ = load_pairs(write_jsonl(tmp_path / "t.jsonl", [row]), format="tldr")
    expected = "SUBREDDIT: r/cats\nTITLE: Help\nPOST: My cat ate my homework.\nTL;DR:"
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (expected, " dog did", " cat ate it")
    ]


TLDR = {
    "info": {"post": "p", "title": "t", "subreddit": "s"},
    "summaries": [{"text": "a"}, {"text": "b"}],
    "choice": 0,
}
ALPACA = {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 1}


def turns(*pairs: tuple[str, object]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


ASSISTANT_A, ASSISTANT_B = turns(("assistant", "a")), turns(("assistant", "b"))
MALFORMED = [  # (format, bad record placed on line 2, message fragment)
    ("plain", "{not json", "bad JSON"),
    ("plain", "[1, 2]", "expected a JSON object, got list"),
    ("plain", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ("plain", {**GOOD, "chosen": 5}, "field 'chosen' must be string, got integer"),
    ("plain", {**GOOD, "prompt": "  "}, "empty prompt (field 'prompt')"),
    ("plain", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not valid UTF-8"),
    ("plain", {**GOOD, "prompt": "<s>q"}, "literal '<s>'"),
    ("plain", {**GOOD, "id": True}, "field 'id' must be string or integer, got boolean"),
    ("plain", {"chosen": turns(("user", "q")), "rejected": []}, "assistant message"),
    (
        "plain",
        {"chosen": turns(("user", "q"), ("assistant", "a")),
         "rejected": turns(("user", "Q"), ("assistant", "b"))},
        "differ before their final message",
    ),
    ("plain", {"chosen": ASSISTANT_A, "rejected": ASSISTANT_B}, "missing field 'prompt'"),
    (
        "plain",
        {"prompt": turns(("assistant", "q")), "chosen": ASSISTANT_A, "rejected": ASSISTANT_B},
        "role 'assistant', expected 'user'",
    ),
    (
        "plain",
        {"chosen": turns(("user", 1), ("assistant", "a")), "rejected": []},
        "field 'chosen[0].content' must be string",
    ),
    ("ultrafeedback", {"prompt": "q", "chosen": [], "rejected": []}, "missing field 'prompt_id'"),
    ("alpaca_comparison", {**ALPACA, "preference": 3}, "'preference' must be one of (1, 2), got 3"),
    ("alpaca_comparison", {**ALPACA, "instruction": ""}, "empty prompt (field 'instruction')"),
    ("tldr", {**TLDR, "summaries": [{"text": "a"}]}, "must hold 2 entries"),
    ("tldr", {**TLDR, "choice": "0"}, "field 'choice' must be integer, got string"),
    ("tldr", {**TLDR, "info": {"post": "p", "title": "t"}}, "missing field 'info.subreddit'"),
    ("tldr", {**TLDR, "summaries": [{"text": "a"}, {}]}, "missing field 'summaries[1].text'"),
]  # fmt: skip
GOOD_LINE = {
    "plain": GOOD,
    "ultrafeedback": uf_row("x", "a", "b"),
    "alpaca_comparison": ALPACA,
    "tldr": TLDR,
}


@pytest.mark.parametrize(("format", "bad", "message"), MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path: Path, format: str, bad, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE[format], bad, GOOD_LINE[format]])
    with pytest.raises(ValueError) as err:
        load_pairs(path, format=format)
    assert f"{path}:2: " in str(err.value)
    assert message in str(err.value)


def test_duplicate_explicit_id_names_both_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{**GOOD, "id": "x"}, GOOD, {**GOOD, "chosen": "four", "id": "x"}]
    )
    with pytest.raises(ValueError, match=f"{path}:3: duplicate id 'x', first used at {path}:1"):
        load_pairs(path)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_pairs(tmp_path / "missing.jsonl")
    for content in (b"", b"\n  \n"):
        (tmp_path / "empty.jsonl").write_bytes(content)
        with pytest.raises(ValueError, match="no pairs"):
            load_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="unknown data format"):
        load_pairs(write_jsonl(tmp_path / "g.jsonl", [GOOD]), format="csv")


def test_skips_are_counted(tmp_path: Path) -> None:
    lines = [
        GOOD,
        {**GOOD, "chosen": "5"},
        {**GOOD, "rejected": " \n"},
        GOOD,
        {**GOOD, "rejected": "6"},
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "s.jsonl", lines))
    assert [p.rejected for p in pairs] == ["5", "6"]
    assert (report.read, report.used) == (5, 2)
    assert report.skipped == {"identical_responses": 1, "empty_response": 1, "duplicate_pair": 1}


class CharTokenizer:
    """One id per character, so the truncation arithmetic can be checked by hand."""

    bos_id, eos_id = 1, 2

    def encode_prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        return [1] + [ord(c) for c in prompt], [ord(c) for c in response] + [2]


def pair(pair_id: str, prompt: str, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(pair_id, prompt, chosen, rejected, f"test:{pair_id}")


def test_truncation_worked_example() -> None:
    pairs = [
        # prompt 1+3 = 4 ids, max_length 7 leaves room 3: chosen "de"+EOS = 3 ids fits with its EOS,
        # rejected "fghij"+EOS = 6 ids is cut to "fgh" and loses its EOS.
        pair("fits", "abc", "de", "fghij"),
        pair("no_room", "abcdef", "x", "y"),  # 1+6 = 7 prompt ids: room 0
        pair("same_cut", "abcde", "xa", "xb"),  # room 1: both become "x"
        pair("one_left", "abcde", "x", "y"),  # room 1: "x" vs "y" still differ
    ]
    tokens, report = tokenize_pairs(pairs, CharTokenizer(), max_length=7)  # type: ignore[arg-type]
    a, b, c, d, e, f, g, h, x, y = (ord(ch) for ch in "abcdefghxy")
    assert tokens == [
        TokenizedPair("fits", (1, a, b, c), (d, e, 2), (f, g, h)),
        TokenizedPair("one_left", (1, a, b, c, d, e), (x,), (y,)),
    ]
    assert (report.read, report.used) == (4, 2)
    assert report.skipped == {"prompt_too_long": 1, "identical_after_truncation": 1}


def test_tokenize_continues_the_load_report(tmp_path: Path, tok: Tokenizer) -> None:
    long_prompt = "the quick brown fox " * 20
    lines = [GOOD, {**GOOD, "chosen": "5"}, {"prompt": long_prompt, "chosen": "a", "rejected": "b"}]
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", lines))
    tokens, final = tokenize_pairs(pairs, tok, max_length=32, report=report)
    assert [t.id for t in tokens] == [pairs[0].id]
    assert (
        final.summary()
        == "read 3 pairs, used 1, skipped 2 (identical_responses: 1, prompt_too_long: 1)"
    )
    assert report.used == 2  # the load report itself is left alone


def test_tokenize_real_tokenizer_bos_eos_and_shared_prompt(tok: Tokenizer) -> None:
    pairs = [
        pair("p", "[INST] Capital of France? [/INST]", "Paris is the capital", "\nLyon, I think")
    ]
    (t,), _ = tokenize_pairs(pairs, tok, max_length=512)
    prompt_ids, chosen_ids = tok.encode_prompt_response(pairs[0].prompt, pairs[0].chosen)
    assert (list(t.prompt_ids), list(t.chosen_ids)) == (prompt_ids, chosen_ids)
    for response in (t.chosen_ids, t.rejected_ids):
        ids = t.prompt_ids + response
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1


def test_tokenize_rejects_bad_input(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pairs([pair("p", "q", "a", "b")], tok, max_length=1)
    with pytest.raises(ValueError, match="duplicate id 'p'"):
        tokenize_pairs([pair("p", "q", "a", "b"), pair("p", "q", "c", "d")], tok, max_length=64)


def noise_pairs(n: int) -> list[PreferencePair]:
    return [pair(f"p{i}", f"q{i}", f"good{i}", f"bad{i}") for i in range(n)]


def test_noise_rate_and_swap() -> None:
    pairs = noise_pairs(10_000)
    noisy, flips = inject_noise(pairs, noise=0.3, seed=0)
    assert abs(sum(flips.values()) / len(pairs) - 0.3) < 0.015  # 3 sigma is 0.014
    assert [p.id for p in noisy] == [p.id for p in pairs]
    for before, after in zip(pairs, noisy, strict=True):
        swapped = (after.chosen, after.rejected) == (before.rejected, before.chosen)
        assert swapped if flips[before.id] else after == before


def test_noise_determinism_and_order_independence() -> None:
    pairs = noise_pairs(2_000)
    _, flips = inject_noise(pairs, noise=0.2, seed=3)
    assert inject_noise(pairs, noise=0.2, seed=3)[1] == flips
    assert inject_noise(pairs, noise=0.2, seed=4)[1] != flips
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    assert inject_noise(shuffled, noise=0.2, seed=3)[1] == flips
    assert inject_noise(pairs[:10], noise=0.2, seed=3)[1] == {p.id: flips[p.id] for p in pairs[:10]}


def test_noise_zero_and_bad_rates() -> None:
    noisy, flips = inject_noise(noise_pairs(1_000), noise=0.0, seed=0)
    assert not any(flips.values()) and noisy == noise_pairs(1_000)
    for bad in (0.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="noise must be in"):
            inject_noise(noise_pairs(3), noise=bad, seed=0)


def test_write_pairs_round_trip(tmp_path: Path) -> None:
    lines = [
        {"prompt": "Multi\nline «prompt» 東京", "chosen": " a\tb 😀", "rejected": "c", "id": "k"},
        {"prompt": "q", "chosen": "x", "rejected": "y\u2028z"},  # U+2028 is not a line break here
    ]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "in.jsonl", lines))
    write_pairs_jsonl(pairs, tmp_path / "sub" / "out.jsonl")
    again, report = load_pairs(tmp_path / "sub" / "out.jsonl")
    strip = lambda ps: [(p.id, p.prompt, p.chosen, p.rejected) for p in ps]  # noqa: E731
    assert strip(again) == strip(pairs) and report.used == 2


def test_report_summary_without_skips() -> None:
    assert DataReport(3, 3).summary() == "read 3 pairs, used 3, skipped 0"


def test_lone_surrogate_escape_is_named_but_a_pair_is_text(tmp_path: Path) -> None:
    emoji = '{"prompt": "smile \\ud83d\\ude00", "chosen": "a", "rejected": "b"}'  # a valid pair
    pairs, _ = load_pairs(write_jsonl(tmp_path / "ok.jsonl", [emoji]))
    assert pairs[0].prompt == "smile \U0001f600"
    for lone in ("\\ud800", "\\uDC00", "\\ud83d x"):  # high or low half alone, any case
        line = '{"prompt": "q", "chosen": "a ' + lone + '", "rejected": "b"}'
        path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line])
        with pytest.raises(ValueError, match=f"{path}:2: a string holds a lone surrogate escape"):
            load_pairs(path)


def test_null_post_is_skipped_and_counted_unless_strict(tmp_path: Path) -> None:
    null_post = {**TLDR, "info": {**TLDR["info"], "post": None}}
    path = write_jsonl(tmp_path / "t.jsonl", [TLDR, null_post, {**TLDR, "choice": 1}])
    pairs, report = load_pairs(path, format="tldr")
    assert (len(pairs), report.read, report.skipped) == (2, 3, {"null_post": 1})
    assert report.summary() == "read 3 pairs, used 2, skipped 1 (null_post: 1)"
    with pytest.raises(ValueError, match=f"{path}:2: field 'info.post' is null.*strict_data=true"):
        load_pairs(path, format="tldr", strict=True)
    missing_post = {**TLDR, "info": {"title": "t", "subreddit": "s"}}  # not null: still an error
    with pytest.raises(ValueError, match="missing field 'info.post'"):
        load_pairs(write_jsonl(tmp_path / "m.jsonl", [missing_post]), format="tldr")


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def saved_dataset(folder: Path, *names: str) -> Path:
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"{}")
    return folder


NOT_JSONL = [  # (make the path under tmp_path, message fragment after "<path>: ")
    (lambda tmp: saved_dataset(tmp / "d", "dataset_info.json", "state.json", "data.arrow"),
     "is a Hugging Face `datasets` folder (save_to_disk), but data must be a JSONL file; export "
     "it with datasets.load_from_disk('{path}').to_json('pairs.jsonl')"),
    (lambda tmp: saved_dataset(tmp / "d", "dataset_dict.json"),
     "export it with datasets.load_from_disk('{path}')['train'].to_json('pairs.jsonl')"),
    (lambda tmp: saved_dataset(tmp / "d", "only.arrow"), "is a Hugging Face `datasets` folder"),
    (lambda tmp: saved_dataset(tmp / "d", "notes.txt"),
     "is a directory; data must be a JSONL file"),
    (lambda tmp: write_jsonl(tmp / "t.parquet", [b"PAR1\0\0PAR1"]),
     "is a parquet file, but data must be JSONL; export it with datasets.load_dataset('parquet', "
     "data_files='{path}')['train'].to_json('pairs.jsonl')"),
    (lambda tmp: write_jsonl(tmp / "t.jsonl", [b"ARROW1\0\0"]),
     "is an Arrow file, but data must be JSONL; export it with "
     "datasets.Dataset.from_file('{path}').to_json('pairs.jsonl')"),
    (lambda tmp: write_jsonl(tmp / "t.arrow", [b"\xff\xff\xff\xff"]), "is an Arrow file"),
    (lambda tmp: fifo(tmp / "pairs.jsonl"), "is not a regular file"),  # reading it would hang
]  # fmt: skip


@pytest.mark.parametrize(("make", "message"), NOT_JSONL)
def test_what_is_no_jsonl_file_is_named_with_a_way_out(tmp_path: Path, make, message) -> None:
    path = make(tmp_path)
    with pytest.raises(ValueError) as err:
        load_pairs(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message.format(path=path) in str(err.value)
