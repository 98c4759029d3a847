"""The prompts file of `ropo generate`: JSONL records, a JSON list, or plain text -> PromptRecord.

First step of `generate.py`, which renders each record's messages with the chat template and
tokenises them as training tokenises the prompt of a pair. Accepted inputs:
  * `.jsonl`: one object a line, with "prompt" (text), "instruction" (text, AlpacaEval's
    alpaca_eval.json) or "messages" (a conversation ending with a user turn), an optional "id"
    and "dataset"; or an MT-Bench question ("question_id", "category", "turns": [text, ...]);
  * `.json`: the same objects in one JSON list (AlpacaEval ships its prompts so);
  * any other file: plain text, one prompt per line; blank lines are skipped and counted.
Ids default to the line number (the position for a JSON list). Errors name "file:line".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropo.jsonl import decoded_lines, read_records
from ropo.models.files import require_regular_file

PROMPT_FIELDS = ("prompt", "instruction", "messages", "turns")
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class PromptRecord:
    """One input: the conversation to answer first, and for MT-Bench the user turns after it."""

    id: str | int  # "id" / "question_id" of the record, else its line number
    messages: tuple[dict, ...]  # ends with the user turn answered first
    follow_ups: tuple[str, ...]  # MT-Bench: user turns asked after each answer, in order
    source: str  # "file:line"
    dataset: str | None = None  # AlpacaEval's "dataset" field, passed on to its output file

    @property
    def n_turns(self) -> int:
        return 1 + len(self.follow_ups)


@dataclass(frozen=True)
class PromptFile:
    records: list[PromptRecord]
    blank_lines: int  # skipped lines of a plain-text file


def read_prompts(path: str | Path, multi_turn: bool) -> PromptFile:
    """Every prompt of `path` in file order; `multi_turn` allows MT-Bench questions (layout
    mt_bench). A duplicate id or a record without a prompt raises ValueError("file:line: ...")."""
    path = Path(path)
    require_regular_file(path, f"prompts file {path} does not exist")
    if path.suffix not in JSON_SUFFIXES:
        return _read_text(path)
    if _first_char(path) == "[":
        items = _read_json_list(path)
    else:
        items = read_records(path)
    records, seen = [], {}
    for where, record in items:
        parsed = _parse_record(record, where, multi_turn)
        if parsed.id in seen:
            raise ValueError(
                f"{where}: duplicate id {parsed.id!r}, first used at {seen[parsed.id]}"
            )
        seen[parsed.id] = where
        records.append(parsed)
    if not records:
        raise ValueError(f"{path}: no prompts (the file is empty or only blank lines)")
    return PromptFile(records, 0)


def _read_text(path: Path) -> PromptFile:
    """One user turn a line; a line that is a JSON object means the file was meant as JSONL."""
    records, blank = [], 0
    for lineno, line in enumerate(_text_lines(path), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            blank += 1
            continue
        if not records and line.lstrip().startswith("{") and _is_json_object(line):
            raise ValueError(
                f"{where}: this line is a JSON object, but only {' and '.join(JSON_SUFFIXES)} "
                "files are read as records; rename the file (a plain-text file has one prompt "
                "per line)"
            )
        records.append(PromptRecord(lineno, ({"role": "user", "content": line},), (), where))
    if not records:
        raise ValueError(f"{path}: no prompts (the file is empty or only blank lines)")
    return PromptFile(records, blank)


def _text_lines(path: Path) -> Iterator[str]:
    for _, text in decoded_lines(path):
        yield text.rstrip("\r\n")


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _first_char(path: Path) -> str:
    with open(path, "rb") as file:
        head = file.read(4096).decode("utf-8-sig", errors="replace")
    return head.lstrip()[:1]


def _read_json_list(path: Path) -> list[tuple[str, dict]]:
    """("file:[i]" with i counted from 1, object) for a file holding one JSON list of objects."""
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: bad JSON: {err.msg} (column {err.colno})") from None
    located = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"{path}:[{i}]: expected a JSON object, got {type(item).__name__}")
        located.append((f"{path}:[{i}]", item))
    return located


def _parse_record(record: dict[str, Any], where: str, multi_turn: bool) -> PromptRecord:
    given = [name for name in PROMPT_FIELDS if name in record]
    if len(given) != 1:
        found = f"has {', '.join(given)}" if given else "has none"
        raise ValueError(
            f"{where}: a prompt record needs exactly one of the fields "
            f"{', '.join(PROMPT_FIELDS)}; this one {found}"
        )
    default_id = int(where.rsplit(":", 1)[1].strip("[]"))
    dataset = record.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise ValueError(f"{where}: field 'dataset' must be a string, got {dataset!r}")
    if given[0] == "turns":
        return _parse_question(record, where, multi_turn, default_id)
    record_id = _record_id(record, "id", where, default_id)
    if given[0] == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'messages' must be a non-empty list of messages")
        return PromptRecord(record_id, tuple(messages), (), where, dataset)
    text = _text_field(record, given[0], where)
    return PromptRecord(record_id, ({"role": "user", "content": text},), (), where, dataset)


def _parse_question(
    record: dict[str, Any], where: str, multi_turn: bool, default_id: int
) -> PromptRecord:
    """An MT-Bench question: its turns are answered one after another (layout=mt_bench only)."""
    if not multi_turn:
        raise ValueError(
            f"{where}: field 'turns' makes this an MT-Bench question, whose turns are answered "
            "one after another; run with layout=mt_bench"
        )
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: field 'turns' must be a non-empty list of strings")
    for i, turn in enumerate(turns):
        if not turn.strip():
            raise ValueError(f"{where}: turns[{i}] is empty; every turn needs a question")
    record_id = _record_id(record, "question_id", where, default_id)
    first = {"role": "user", "content": turns[0]}
    return PromptRecord(record_id, (first,), tuple(turns[1:]), where, record.get("dataset"))


def _record_id(record: dict[str, Any], name: str, where: str, default: int) -> str | int:
    value = record.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: field '{name}' must be a string or an integer, got {value!r}")
    return value


def _text_field(record: dict[str, Any], name: str, where: str) -> str:
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field '{name}' must be a non-empty string, got {value!r}")
    return value
