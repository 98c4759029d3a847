"""The four preference-record layouts: one JSON object → (prompt messages, chosen, rejected, id);
and the two layouts of a supervised example (`parse_demonstration`, for `ropo sft`).

Part of the data stage, just before `data.py`: `check_jsonl_file` refuses what is no JSONL file
(a folder, a parquet or arrow export), then `load_pairs` picks a parser from `PARSERS` by the
`format` key and builds a PreferencePair from what it returns. Every error names the "file:line".
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMATS = ("plain", "ultrafeedback", "alpaca_comparison", "tldr")
# Files of a Hugging Face `datasets` folder written by save_to_disk (a Dataset; a DatasetDict has
# dataset_dict.json and one such folder per split).
DATASETS_FOLDER_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
TO_JSONL = ".to_json('pairs.jsonl') (the `datasets` library), then pass data=pairs.jsonl"


class SkipRecord(Exception):
    """A record a parser cannot use but the file may go on without: `load_pairs` counts it under
    `reason` in the data report, or stops with `problem` when strict_data is set."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason, self.problem = reason, problem


def check_jsonl_file(path: Path) -> None:
    """FileNotFoundError or ValueError naming `path` unless it may be a JSONL file; a folder, a
    parquet or an arrow file is refused with the way to export it as JSONL."""
    if path.is_dir():
        saved = [path / name for name in DATASETS_FOLDER_FILES] + list(path.glob("*.arrow"))
        if any(file.is_file() for file in saved):
            split = "['train']" if (path / "dataset_dict.json").is_file() else ""
            raise ValueError(
                f"{path}: is a Hugging Face `datasets` folder (save_to_disk), but data must be a "
                f"JSONL file; export it with datasets.load_from_disk('{path}'){split}{TO_JSONL}"
            )
        raise ValueError(f"{path}: is a directory; data must be a JSONL file, one pair per line")
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if not path.is_file():  # reading a FIFO or a device could hang
        raise ValueError(f"{path}: is not a regular file; data must be a JSONL file")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"PAR1"):
        raise ValueError(
            f"{path}: is a parquet file, but data must be JSONL; export it with "
            f"datasets.load_dataset('parquet', data_files='{path}')['train']{TO_JSONL}"
        )
    if magic == b"ARROW1" or path.suffix == ".arrow":  # save_to_disk's arrow streams lack magic
        raise ValueError(
            f"{path}: is an Arrow file, but data must be JSONL; export it with "
            f"datasets.Dataset.from_file('{path}'){TO_JSONL}"
        )


# A parser turns one record into (prompt messages, chosen, rejected, explicit id or None).
Parsed = tuple[list[dict], str, str, str | None]


def _parse_plain(record: dict, where: str) -> Parsed:
    if isinstance(record.get("chosen"), list) or isinstance(record.get("rejected"), list):
        return _parse_messages(record, where)
    prompt = _nonblank(_get(record, "prompt", str, where), "prompt", where)
    chosen, rejected = _get(record, "chosen", str, where), _get(record, "rejected", str, where)
    return [{"role": "user", "content": prompt}], chosen, rejected, _explicit_id(record, where)


def _parse_messages(record: dict, where: str) -> Parsed:
    """Chat style: chosen/rejected are message lists ending with the assistant response. The turns
    before it (equal in both) are the prompt; if there are none, "prompt" holds them (a string is
    one user turn), as in TRL's conversational layout. Otherwise a "prompt" field is not used."""
    chosen, rejected = _get(record, "chosen", list, where), _get(record, "rejected", list, where)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        _check_messages(messages, name, where)
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{where}: field '{name}' must end with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' differ before their final message")
    context, label = chosen[:-1], "chosen[-2].content"
    if not context:
        prompt = _get(record, "prompt", (str, list), where)
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        _check_messages(context, "prompt", where)
        label = "prompt"
    if context:
        _nonblank(context[-1]["content"], label, where)
    return context, chosen[-1]["content"], rejected[-1]["content"], _explicit_id(record, where)


def _parse_ultrafeedback(record: dict, where: str) -> Parsed:
    """HuggingFaceH4/ultrafeedback_binarized rows; the message lists carry the prompt."""
    prompt_id = _nonblank(_get(record, "prompt_id", str, where), "prompt_id", where)
    context, chosen, rejected, _ = _parse_messages(record, where)
    return context, chosen, rejected, prompt_id


def _parse_alpaca(record: dict, where: str) -> Parsed:
    """AlpacaFarm preference rows: prompt = instruction (+ "\\n\\n" + input when non-empty)."""
    instruction = _nonblank(_get(record, "instruction", str, where), "instruction", where)
    extra = _get(record, "input", str, where) if "input" in record else ""
    prompt = instruction + ("\n\n" + extra if extra.strip() else "")
    first, second = _get(record, "output_1", str, where), _get(record, "output_2", str, where)
    preference = _choice(record, "preference", (1, 2), where)
    chosen, rejected = (first, second) if preference == 1 else (second, first)
    return [{"role": "user", "content": prompt}], chosen, rejected, _explicit_id(record, where)


def _parse_tldr(record: dict, where: str) -> Parsed:
    """openai/summarize_from_feedback comparisons (Reddit posts)."""
    info = _get(record, "info", dict, where)
    if "post" in info and info["post"] is None:  # no post, no TL;DR prompt: skip the row
        raise SkipRecord("null_post", f"{where}: field 'info.post' is null, so no prompt")
    post = _nonblank(_get(info, "post", str, where, "info.post"), "info.post", where)
    title = _get(info, "title", str, where, "info.title")
    subreddit = _get(info, "subreddit", str, where, "info.subreddit")
    summaries = _get(record, "summaries", list, where)
    if len(summaries) != 2:
        raise ValueError(f"{where}: field 'summaries' must hold 2 entries, has {len(summaries)}")
    texts = []
    for i, summary in enumerate(summaries):
        label = f"summaries[{i}]"
        summary = _get({label: summary}, label, dict, where)
        texts.append(_get(summary, "text", str, where, f"{label}.text"))
    choice = _choice(record, "choice", (0, 1), where)
    prompt = f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
    chosen, rejected = texts[choice], texts[1 - choice]
    return [{"role": "user", "content": prompt}], chosen, rejected, _explicit_id(record, where)


PARSERS: dict[str, Callable[[dict, str], Parsed]] = {
    "plain": _parse_plain,
    "ultrafeedback": _parse_ultrafeedback,
    "alpaca_comparison": _parse_alpaca,
    "tldr": _parse_tldr,
}


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str, label: str = "") -> Any:
    """obj[key], checked to be of JSON type `kind`; `label` names nested fields ("info.post")."""
    label = label or key
    if key not in obj:
        raise ValueError(f"{where}: missing field '{label}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is not an integer
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(_JSON_TYPES[k] for k in kinds)
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise ValueError(f"{where}: field '{label}' must be {expected}, got {got}")
    return value


_JSON_TYPES = {str: "string", list: "array", dict: "object", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}  # fmt: skip


def _nonblank(text: str, label: str, where: str) -> str:
    if not text.strip():
        raise ValueError(f"{where}: empty prompt (field '{label}')")
    return text


def _check_messages(messages: list, name: str, where: str) -> None:
    for i, message in enumerate(messages):
        label = f"{name}[{i}]"
        _get({label: message}, label, dict, where)
        _get(message, "role", str, where, f"{label}.role")
        _get(message, "content", str, where, f"{label}.content")


def _choice(record: dict, key: str, allowed: tuple[int, ...], where: str) -> int:
    value = _get(record, key, int, where)
    if value not in allowed:
        raise ValueError(f"{where}: field '{key}' must be one of {allowed}, got {value}")
    return value


def _explicit_id(record: dict, where: str) -> str | None:
    if "id" not in record:
        return None
    pair_id = str(_get(record, "id", (str, int), where))
    if not pair_id.strip():
        raise ValueError(f"{where}: field 'id' is empty")
    return pair_id


def parse_demonstration(record: dict, where: str) -> tuple[list[dict], str, str | None]:
    """A supervised example of `ropo sft`: (prompt messages, response, explicit id or None).

    {"prompt", "response"}: the prompt is a string (one user turn) or a message list.
    {"messages": [...]}: the last message, the assistant's, is the response; those before it
    (ending with a user turn) are the prompt.
    """
    if "messages" in record:
        messages = _get(record, "messages", list, where)
        _check_messages(messages, "messages", where)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(
                f"{where}: field 'messages' must end with an assistant message (the response) "
                "after at least one prompt turn"
            )
        context, response, label = messages[:-1], messages[-1]["content"], "messages[-2].content"
    else:
        prompt = _get(record, "prompt", (str, list), where)
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        _check_messages(context, "prompt", where)
        if not context:
            raise ValueError(f"{where}: empty prompt (field 'prompt' is an empty list)")
        response, label = _get(record, "response", str, where), "prompt"
    _nonblank(context[-1]["content"], label, where)
    return context, response, _explicit_id(record, where)
