"""Preference data: JSONL file → PreferencePair (text) → TokenizedPair (ids), plus label noise.

Sits between the tokenizer and the model: `run_setup.py` loads pairs here (each line read by
`jsonl.py`, each record by a parser of `data_formats.py`, its prompt and responses rendered by the
run's chat format), optionally flips labels with a known mask (for the noise audit), and tokenises
them. Every pair keeps its `id` to the audit file.

Truncation rule (tokenize_pairs): the prompt is never cut; each response is cut at its end so that
len(prompt_ids) + len(response_ids) <= max_length, losing its EOS when cut. A prompt that leaves no
room for a response token is skipped ("prompt_too_long"), as is a pair whose two responses are equal
after truncation ("identical_after_truncation"): its DPO loss is a constant ln 2.
"""

import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from ropo.data_formats import FORMATS, PARSERS, SkipRecord, check_jsonl_file
from ropo.jsonl import read_records
from ropo.models.boundary import BOS_TEXT
from ropo.models.chat_format import PLAIN, ChatFormat
from ropo.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class PreferencePair:
    id: str  # explicit "id" / prompt_id from the record, else a content hash
    prompt: str  # rendered with the chat format, ready for the tokenizer
    chosen: str  # the text the chat format puts after the prompt (a model's template: with its
    rejected: str  # end-of-turn tokens; mistral-instruct: after a space), see ChatFormat.response
    source: str  # "file:line", for messages


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    prompt_ids: tuple[int, ...]  # starts with the only BOS, if the model uses one
    chosen_ids: tuple[int, ...]  # ends with EOS (or the template's end of turn) unless truncated
    rejected_ids: tuple[int, ...]


@dataclass
class DataReport:
    """What happened to the records of one file; read == used + sum(skipped.values())."""

    read: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    unit: str = "pairs"  # what a record is: "examples" for ropo sft's demonstration files

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        """One line: "read 1000 pairs, used 987, skipped 13 (prompt_too_long: 10, ...)"."""
        n_skipped = sum(self.skipped.values())
        line = f"read {self.read} {self.unit}, used {self.used}, skipped {n_skipped}"
        reasons = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        return line + (f" ({', '.join(f'{r}: {n}' for r, n in reasons)})" if reasons else "")


def load_pairs(
    path: str | Path, format: str = "plain", chat: ChatFormat = PLAIN, strict: bool = False
) -> tuple[list[PreferencePair], DataReport]:
    """Pairs of a JSONL file in one of FORMATS, prompt and responses rendered with `chat`.

    Ids: the record's "id" (ultrafeedback: "prompt_id", a repeat gets "#2", "#3", ...), else the
    first 16 hex digits of sha1(prompt, chosen, rejected). Exact repeats of a pair without an
    explicit id are skipped ("duplicate_pair"); a repeated explicit id is an error naming both
    lines. Also skipped: an empty or all-whitespace response ("empty_response"), chosen == rejected
    ("identical_responses"), and unless `strict` a record its parser can do without (tldr: a
    null post, "null_post"). Blank lines are ignored; bad input raises ValueError("file:line: ...").
    The checks and the id hash see the responses as the record has them, before rendering.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    path = Path(path)
    check_jsonl_file(path)
    report, pairs = DataReport(), []
    id_lines: dict[str, str] = {}  # id -> "file:line" that claimed it
    contents: set[str] = set()
    for where, record in read_records(path):
        report.read += 1
        try:
            messages, chosen, rejected, pair_id = PARSERS[format](record, where)
        except SkipRecord as skip:
            if strict:
                raise ValueError(
                    f"{skip.problem}; strict_data=true stops here (without it such rows are "
                    f"skipped and counted as {skip.reason})"
                ) from None
            report.skip(skip.reason)
            continue
        prompt = render_prompt(messages, chat, where)
        content = _content_hash(prompt, chosen, rejected)
        if format == "ultrafeedback" and content not in contents:
            pair_id = _unused(pair_id, id_lines)
        explicit = pair_id is not None and format != "ultrafeedback"
        if explicit:
            _claim(pair_id, where, id_lines)
        duplicate = content in contents and not explicit
        reason = _skip_reason(chosen, rejected) or ("duplicate_pair" if duplicate else "")
        if reason:
            report.skip(reason)
            continue
        pair_id = content[:16] if pair_id is None else pair_id
        if not explicit:
            _claim(pair_id, where, id_lines)
        contents.add(content)
        chosen = render_response(messages, chosen, chat, where)
        rejected = render_response(messages, rejected, chat, where)
        pairs.append(PreferencePair(pair_id, prompt, chosen, rejected, where))
    if report.read == 0:
        raise ValueError(f"{path}: no pairs (the file is empty or only blank lines)")
    report.used = len(pairs)
    return pairs, report


def render_prompt(messages: list[dict], chat: ChatFormat, where: str) -> str:
    """The prompt text of `messages` in the chat format; errors name `where` (file:line)."""
    try:
        prompt = chat.prompt(messages)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not chat.jinja and prompt.startswith(BOS_TEXT):
        raise ValueError(
            f"{where}: the prompt starts with a literal {BOS_TEXT!r}; BOS is added as a token id, "
            "so remove it from the text (a second BOS would follow)"
        )
    return prompt


def render_response(messages: list[dict], response: str, chat: ChatFormat, where: str) -> str:
    """The text of `response` after the prompt of `messages`; errors name `where` (file:line)."""
    try:
        return chat.response(messages, response)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _content_hash(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha1("\0".join((prompt, chosen, rejected)).encode("utf-8")).hexdigest()


def _claim(pair_id: str, where: str, id_lines: dict[str, str]) -> None:
    if pair_id in id_lines:
        raise ValueError(f"{where}: duplicate id {pair_id!r}, first used at {id_lines[pair_id]}")
    id_lines[pair_id] = where


def _unused(base: str, taken: dict[str, str]) -> str:
    """`base`, or `base#2`, `base#3`, ... whichever is free: repeats are kept apart, not merged."""
    candidate, k = base, 1
    while candidate in taken:
        k += 1
        candidate = f"{base}#{k}"
    return candidate


def _skip_reason(chosen: str, rejected: str) -> str:
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    return "identical_responses" if chosen == rejected else ""


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer: Tokenizer,
    max_length: int,
    report: DataReport | None = None,
    chat: ChatFormat = PLAIN,
) -> tuple[list[TokenizedPair], DataReport]:
    """Token ids of every pair under the truncation rule in the module docstring; `chat` is the
    format that rendered the pairs (any named one encodes as PLAIN does: BOS and EOS added).

    The prompt's ids are shared by both responses; one EOS (or the model template's end of turn)
    ends each uncut response. Returns the kept pairs in order and a report that continues
    `report` (a copy; `report` is not changed).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    base = DataReport(len(pairs)) if report is None else report
    report = DataReport(base.read, 0, dict(base.skipped))
    seen: dict[str, str] = {}
    quiet = len(pairs) < 1000 or not sys.stderr.isatty()
    kept = []
    for pair in tqdm(pairs, desc="tokenize", unit="pair", disable=quiet):
        if pair.id in seen:
            raise ValueError(f"{pair.source}: duplicate id {pair.id!r}, also at {seen[pair.id]}")
        seen[pair.id] = pair.source
        prompt_ids, chosen_ids = chat.encode(tokenizer, pair.prompt, pair.chosen)
        prompt_again, rejected_ids = chat.encode(tokenizer, pair.prompt, pair.rejected)
        assert prompt_ids == prompt_again, "prompt ids must not depend on the response"
        room = max_length - len(prompt_ids)
        if room < 1:
            report.skip("prompt_too_long")
            continue
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            report.skip("identical_after_truncation")
            continue
        kept.append(
            TokenizedPair(pair.id, tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids))
        )
    report.used = len(kept)
    return kept, report


def inject_noise(
    pairs: list[PreferencePair], noise: float, seed: int
) -> tuple[list[PreferencePair], dict[str, bool]]:
    """Symmetric label noise: swap chosen/rejected of each pair with probability `noise`.

    A pair's flip is a function of (seed, id) alone, so it does not depend on the other pairs or
    their order. Returns the pairs in the same order with the same ids, and {id: flipped}.
    """
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise must be in [0, 0.5), got {noise!r}")
    noisy, flips = [], {}
    for pair in pairs:
        if pair.id in flips:
            raise ValueError(f"{pair.source}: duplicate id {pair.id!r}; flips are keyed by id")
        flips[pair.id] = _uniform(seed, pair.id) < noise
        noisy.append(
            replace(pair, chosen=pair.rejected, rejected=pair.chosen) if flips[pair.id] else pair
        )
    return noisy, flips


def _uniform(seed: int, pair_id: str) -> float:
    """A number in [0, 1) that is uniform over ids and fixed by (seed, id)."""
    digest = hashlib.sha256(f"{seed}\0{pair_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def write_pairs_jsonl(pairs: list[PreferencePair], path: str | Path) -> None:
    """Write pairs in the "plain" format. Pairs a named template rendered read back unchanged
    with load_pairs(path) (ids included; the text is rendered already, so the "plain" template)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        for p in pairs:
            record = {"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
