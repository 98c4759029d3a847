"""The files `ropo generate` writes: our JSONL, AlpacaEval's model outputs, MT-Bench's answers.

Last step of `generate.py`. Each writer turns answered conversations into the records one tool
reads, and the file is written under a temporary name and renamed, so a crash never leaves half a
file that a judge would score. The fields are those the tools read:
  * AlpacaEval (`alpaca_eval --model_outputs FILE`): one JSON list of {"instruction", "output",
    "generator"}, plus "dataset" when the prompts had it; "instruction" is the user's text as given,
    which AlpacaEval matches against its reference outputs;
  * MT-Bench (FastChat's llm_judge, data/mt_bench/model_answer/<model_id>.jsonl): one line per
    question, {"question_id", "answer_id", "model_id", "choices": [{"index", "turns": [...]}],
    "tstamp"}, keyed by question_id; each choice holds the answers to every turn in order.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ropo.generate_prompts import PromptRecord
from ropo.models.files import write_atomic


@dataclass(frozen=True)
class Response:
    """One generated answer: its new token ids (EOS kept when produced) and their text."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (EOS produced) | "length" (no room left) | "prompt_too_long"


@dataclass
class Conversation:
    """One sample of one record: the messages so far and the answer to each turn."""

    record: PromptRecord
    sample: int  # 0 .. n-1
    messages: list[dict]  # ends with a user turn while an answer is awaited
    prompt: str = ""  # the first turn's prompt as rendered with the chat template
    responses: list[Response] = field(default_factory=list)


def write_responses(
    conversations: list[Conversation], layout: str, path: Path, generator: str, n: int
) -> None:
    """Write `conversations` (in input order, the n samples of a record together) as `layout`."""
    write = {"jsonl": _jsonl, "alpaca_eval": _alpaca_eval, "mt_bench": _mt_bench}[layout]

    def write_file(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as file:
            write(conversations, generator, n, file.write)

    write_atomic(path, write_file)


def _jsonl(conversations: list[Conversation], generator: str, n: int, emit: Callable) -> None:
    for c in conversations:
        response = c.responses[0]
        record: dict[str, Any] = {"id": c.record.id}
        if n > 1:
            record["sample"] = c.sample
        record |= {
            "prompt": c.prompt,
            "output": response.text,
            "generator": generator,
            "n_tokens": len(response.token_ids),
            "finish_reason": response.finish_reason,
        }
        emit(json.dumps(record, ensure_ascii=False) + "\n")


def _alpaca_eval(conversations: list[Conversation], generator: str, n: int, emit: Callable) -> None:
    assert n == 1, "AlpacaEval scores one output per instruction"
    outputs = []
    for c in conversations:
        output = {
            "instruction": c.record.messages[-1]["content"],
            "output": c.responses[0].text,
            "generator": generator,
        }
        if c.record.dataset is not None:
            output["dataset"] = c.record.dataset
        outputs.append(output)
    emit(json.dumps(outputs, ensure_ascii=False, indent=2) + "\n")


def _mt_bench(conversations: list[Conversation], generator: str, n: int, emit: Callable) -> None:
    for start in range(0, len(conversations), n):
        samples = conversations[start : start + n]
        answer = {
            "question_id": samples[0].record.id,
            "answer_id": uuid.uuid4().hex,
            "model_id": generator,
            "choices": [
                {"index": c.sample, "turns": [r.text for r in c.responses]} for c in samples
            ],
            "tstamp": time.time(),
        }
        emit(json.dumps(answer, ensure_ascii=False) + "\n")
