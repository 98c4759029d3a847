"""Preference pairs from the model's own samples, ranked by the gold reward.

Third stage (stages.py): the K responses per training prompt that `ropo generate` wrote become
one pair per prompt, chosen = the highest gold reward, rejected = the lowest; a prompt whose K
responses all score the same gives none. The pairs are written in ropo's "plain" format.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from ropo.jsonl import read_records
from ropo_constraints.constraints import gold_reward, satisfied
from ropo_constraints.prompts import PromptSpec


@dataclass(frozen=True)
class PairStats:
    """What pair building found, for the report."""

    prompts: int
    pairs: int
    skipped_ties: int  # prompts whose K responses all had the same gold reward
    mean_reward: float  # over every sampled response
    mean_chosen_reward: float
    mean_rejected_reward: float
    chosen_obeys_all: float  # share of pairs whose chosen response obeys every constraint

    def to_dict(self) -> dict:
        return asdict(self)


def read_responses(path: Path) -> dict[str, list[str]]:
    """`ropo generate`'s JSONL (layout=jsonl) -> prompt id -> its responses in sample order."""
    by_id: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for where, record in read_records(path):
        if "id" not in record or "output" not in record:
            raise ValueError(f"{where}: expected `ropo generate` output with 'id' and 'output'")
        by_id[str(record["id"])].append((record.get("sample", 0), record["output"]))
    return {key: [text for _, text in sorted(samples)] for key, samples in by_id.items()}


def responses_of(
    specs: list[PromptSpec], responses: dict[str, list[str]], source: Path
) -> list[list[str]]:
    """The responses of each spec, in spec order; ValueError naming `source` if one is missing."""
    missing = [spec.id for spec in specs if spec.id not in responses]
    if missing:
        raise ValueError(f"{source}: no responses for prompt ids {', '.join(missing[:5])}")
    return [responses[spec.id] for spec in specs]


def build_pairs(
    specs: list[PromptSpec], responses: list[list[str]]
) -> tuple[list[dict], PairStats]:
    """One "plain" pair record per prompt whose responses do not all tie, and the stats.

    chosen = the first response with the highest gold reward, rejected = the first with the
    lowest; both rewards go into the record beside the fields ropo reads.
    """
    records, all_rewards, ties, obeys = [], [], 0, 0
    for spec, texts in zip(specs, responses, strict=True):
        rewards = [gold_reward(spec.constraints, text) for text in texts]
        all_rewards += rewards
        best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
        if rewards[best] == rewards[worst]:
            ties += 1
            continue
        obeys += all(satisfied(c, texts[best]) for c in spec.constraints)
        records.append(
            {
                "id": spec.id,
                "prompt": spec.text,
                "chosen": texts[best],
                "rejected": texts[worst],
                "chosen_reward": rewards[best],
                "rejected_reward": rewards[worst],
            }
        )
    n = max(len(records), 1)  # the means of no pairs are reported as 0
    stats = PairStats(
        prompts=len(specs),
        pairs=len(records),
        skipped_ties=ties,
        mean_reward=sum(all_rewards) / max(len(all_rewards), 1),
        mean_chosen_reward=sum(r["chosen_reward"] for r in records) / n,
        mean_rejected_reward=sum(r["rejected_reward"] for r in records) / n,
        chosen_obeys_all=obeys / n,
    )
    return records, stats


def write_pairs(records: list[dict], path: Path) -> None:
    """The pair records as JSONL, one a line (ropo train data=..., format=plain)."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    path.write_text("".join(lines), encoding="utf-8")
