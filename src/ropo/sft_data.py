"""Supervised examples for `ropo sft`: JSONL records -> Demonstration (text) -> SftExample (ids).

The data stage of SFT, beside data.py. A file of preference pairs, in any format, is read by
`data.load_pairs` and each pair's chosen response becomes the target. A plain file of
{"prompt", "response"} or {"messages": [...]} records is read here (data_formats.py parses each
record). Prompt and response are rendered with the run's chat format and tokenised as pairs are
(models/chat_format.py). Truncation: the prompt is never cut; the response is cut at its end to fit
max_length (losing its EOS); an example whose prompt leaves no room is skipped ("prompt_too_long").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ropo.data import DataReport, load_pairs, render_prompt, render_response
from ropo.data_formats import check_jsonl_file, parse_demonstration
from ropo.jsonl import read_records
from ropo.models import Tokenizer
from ropo.models.chat_format import ChatFormat


@dataclass(frozen=True)
class Demonstration:
    id: str  # the record's "id", else a content hash (a pair's id for a preference record)
    prompt: str  # rendered with the chat format, ready for the tokenizer
    response: str  # the target (the response, the last assistant message or a pair's chosen)
    # as the chat format renders it after the prompt
    source: str  # "file:line"


@dataclass(frozen=True)
class SftExample:
    id: str
    prompt_ids: tuple[int, ...]  # starts with the only leading BOS; no loss on these
    response_ids: tuple[int, ...]  # the targets; end with EOS unless truncated


def load_demonstrations(
    path: Path, format: str, chat: ChatFormat, strict: bool
) -> tuple[list[Demonstration], DataReport]:
    """The examples of a JSONL file and what happened to its records.

    A file whose records are preference pairs (any `format` but plain, or plain records with a
    "chosen" field; the first record decides) trains on the chosen responses; otherwise every
    record must be a {"prompt", "response"} or {"messages"} record. Errors name file:line.
    """
    check_jsonl_file(path)
    first = next(read_records(path), None)
    if first is not None and (format != "plain" or "chosen" in first[1]):
        pairs, report = load_pairs(path, format, chat, strict=strict)
        return [Demonstration(p.id, p.prompt, p.chosen, p.source) for p in pairs], report
    return read_demonstrations(path, chat)


def read_demonstrations(path: Path, chat: ChatFormat) -> tuple[list[Demonstration], DataReport]:
    """The {"prompt", "response"} / {"messages"} records of `path`, rendered with `chat`.

    Ids: the record's "id" (a repeated one is an error naming both lines), else the first 16 hex
    digits of sha1(prompt, response). Skipped: an empty or all-whitespace response
    ("empty_response"), an exact repeat of an example without an id ("duplicate_example"). As
    for pairs, these checks see the response as the record has it, before rendering.
    """
    report, examples = DataReport(unit="examples"), []
    id_lines: dict[str, str] = {}  # id -> "file:line" that claimed it
    contents: set[str] = set()
    for where, record in read_records(path):
        report.read += 1
        if "chosen" in record:
            raise ValueError(
                f"{where}: a preference record (chosen/rejected) in a file whose first record "
                "is a prompt/response or messages record; keep one kind of record per file"
            )
        messages, response, example_id = parse_demonstration(record, where)
        prompt = render_prompt(messages, chat, where)
        content = hashlib.sha1(f"{prompt}\0{response}".encode()).hexdigest()
        if example_id is not None:
            _claim(example_id, where, id_lines)
        if not response.strip():
            report.skip("empty_response")
            continue
        if example_id is None:
            if content in contents:
                report.skip("duplicate_example")
                continue
            example_id = content[:16]
            _claim(example_id, where, id_lines)
        contents.add(content)
        response = render_response(messages, response, chat, where)
        examples.append(Demonstration(example_id, prompt, response, where))
    if report.read == 0:
        raise ValueError(f"{path}: no examples (the file is empty or only blank lines)")
    report.used = len(examples)
    return examples, report


def _claim(example_id: str, where: str, id_lines: dict[str, str]) -> None:
    if example_id in id_lines:
        raise ValueError(
            f"{where}: duplicate id {example_id!r}, first used at {id_lines[example_id]}"
        )
    id_lines[example_id] = where


def tokenize_demonstrations(
    examples: list[Demonstration],
    tokenizer: Tokenizer,
    max_length: int,
    report: DataReport,
    chat: ChatFormat,
) -> tuple[list[SftExample], DataReport]:
    """Token ids of every example under the truncation rule in the module docstring (`chat` is
    the format that rendered them); returns the kept examples in order and a report that
    continues `report` (which is not changed)."""
    report = DataReport(report.read, 0, dict(report.skipped), report.unit)
    kept = []
    for example in examples:
        prompt_ids, response_ids = chat.encode(tokenizer, example.prompt, example.response)
        room = max_length - len(prompt_ids)
        if room < 1:
            report.skip("prompt_too_long")
            continue
        kept.append(SftExample(example.id, tuple(prompt_ids), tuple(response_ids[:room])))
    report.used = len(kept)
    return kept, report
