"""JSONL files, line by line: records read with their "file:line" for error messages, lines
appended, and the truncation a resumed run does to its audit files.

Plumbing under the data stage and the audit, which a reader of the method can skip: data.py
reads its pairs through `read_records`, audit.py and the training loops append through
`append_jsonl`, and the run summaries and the built-in task read a run's files back through
`read_jsonl`. Comes before data.py in the data flow, so every stage can use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ropo.models.files import write_atomic


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line; bytes are decoded line by line so that bad UTF-8 is
    reported with its line instead of failing inside the codec."""
    with open(path, "rb") as file:
        for lineno, raw in enumerate(file, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {err.start} of the line)"
                ) from None


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", JSON object) for every non-blank line."""
    for lineno, line in decoded_lines(path):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: bad JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if _SURROGATE_ESCAPE.search(line) and not _is_unicode(record):
            raise ValueError(
                f"{where}: a string holds a lone surrogate escape (\\ud800 to \\udfff without "
                "its pair), which is no Unicode character; fix or drop the line"
            )
        yield where, record


# json.loads accepts "\ud800" alone, but such a string cannot be encoded (tokenised, written) later.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _is_unicode(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file, checked as read_records checks them."""
    return [record for _, record in read_records(path)]


def append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Keep only the lines for which `keep` holds (a resumed run rewrites the rest, never twice).

    A last line without its newline is an append that a crash cut short and is dropped; any other
    unreadable line raises ValueError("file:line"). The file is replaced atomically, so a crash
    during the rewrite loses nothing.
    """
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    lines.pop()  # b"" after the final newline, or the torn last line
    kept = []
    for lineno, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8")) if line.strip() else None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{path}:{lineno}: unreadable line in an audit file") from None
        if record is not None and keep(record):
            kept.append(line + b"\n")
    write_atomic(path, b"".join(kept))
