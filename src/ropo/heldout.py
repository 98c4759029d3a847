"""Held-out preference pairs of a run: scored during training, never trained on.

Part of the data stage: run_setup.py calls `split_heldout` on the loaded pairs before any noise
is injected (an `eval_split` share of data= stays clean and out of training), or reads the file
`eval_data=`; `prepare_heldout` tokenises either like the training pairs and reports what it
skipped. train.py scores them with the policy; evaluate.py turns the scores into metrics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropo.config import RunConfig
from ropo.data import PreferencePair, TokenizedPair, load_pairs, tokenize_pairs
from ropo.fingerprints import file_sha256
from ropo.models import Tokenizer
from ropo.models.chat_format import ChatFormat
from ropo.presets import resolve_data


@dataclass(frozen=True)
class HeldoutPairs:
    """The tokenised held-out pairs and how they were obtained."""

    tokens: list[TokenizedPair]
    split_ids: list[str]  # ids carved out of data= by eval_split (run.json eval_ids); else []
    summary: str  # one line for the data report


def split_heldout(
    pairs: list[PreferencePair], share: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs), each in file order.

    The held-out pairs are the round(share * N) pairs (at least one when share > 0) whose hash of
    (seed, id) is smallest: which pairs are held out depends on the seed and their ids alone, not
    on the order of the file or on the noise (whose draw hashes (seed, id) differently).
    """
    if share == 0:
        return pairs, []
    n_heldout = max(1, round(share * len(pairs)))
    ranked = sorted(pairs, key=lambda pair: (_heldout_rank(seed, pair.id), pair.id))
    chosen = {pair.id for pair in ranked[:n_heldout]}
    return [p for p in pairs if p.id not in chosen], [p for p in pairs if p.id in chosen]


def _heldout_rank(seed: int, pair_id: str) -> bytes:
    return hashlib.sha256(f"heldout\0{seed}\0{pair_id}".encode()).digest()


def prepare_heldout(
    cfg: RunConfig, tokenizer: Tokenizer, chat: ChatFormat, split_off: list[PreferencePair]
) -> HeldoutPairs | None:
    """The held-out pairs rendered and tokenised like the training pairs (chat format,
    max_length): `split_off` (carved out by eval_split) or the pairs of eval_data; None when the
    run has neither."""
    if cfg.heldout.eval_split:
        tokens, report = tokenize_pairs(split_off, tokenizer, cfg.data.max_length, chat=chat)
        source, split_ids = f"eval_split={cfg.heldout.eval_split}", [p.id for p in split_off]
    elif cfg.heldout.eval_data:
        path, data_format = eval_data_file(cfg)
        pairs, report = load_pairs(path, data_format, chat, strict=cfg.data.strict_data)
        tokens, report = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, report, chat)
        source, split_ids = f"eval_data={path}", []
    else:
        return None
    if not tokens:
        raise ValueError(f"{source}: no usable held-out pairs ({report.summary()})")
    return HeldoutPairs(tokens, split_ids, f"held-out pairs ({source}): {report.summary()}")


def eval_data_file(cfg: RunConfig) -> tuple[Path, str]:
    """(file, format) of eval_data, read with the run's format key; errors name the key."""
    try:
        return resolve_data(cfg.heldout.eval_data, cfg.data.format)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"config key 'eval_data': {err}") from None


def heldout_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The eval_data file's sha256 for run.json `inputs` (a resume refuses a changed file)."""
    if not cfg.heldout.eval_data:
        return {}
    path, _ = eval_data_file(cfg)
    return {"eval_data": {"path": str(path), "sha256": file_sha256(path)}}
