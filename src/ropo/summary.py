"""The last lines of a run: what a person needs to act on, read back from the run's own files.

Built from metrics.jsonl, so a resumed run summarises every round, including those trained
before the interruption. Rounds are numbered from 1 here as in every file the run writes.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from ropo.jsonl import read_jsonl

# What a run may leave in its directory, in the order a person would open it.
OUTPUTS = ("final", "run.json", "metrics.jsonl", "pairs.jsonl", "cleaned.jsonl", "train_log.jsonl",
           "flips.json", "sampled_pairs.jsonl", "checkpoints")  # fmt: skip


def run_summary(out: Path, data_summary: str, wall_seconds: float, n_skipped_nonfinite: int) -> str:
    """The run in a few lines: wall time, pairs used and skipped, each round's kept and dropped
    counts with accuracy (and flip detection when noise was injected), and the files written."""
    rounds = read_jsonl(out / "metrics.jsonl")
    rounds = [r for r in rounds if r.get("round", 0) >= 1]
    lines = [
        f"run finished: {timedelta(seconds=round(wall_seconds))} wall time in this process",
        f"pairs: {data_summary}",
    ]
    lines += [_round_line(r) for r in rounds]
    if rounds:
        lines.append(_final_line(rounds[-1]))
    if n_skipped_nonfinite:
        lines.append(f"skip_nonfinite: {n_skipped_nonfinite} steps skipped for a NaN/inf value")
    written = [f"{out / name}" for name in OUTPUTS if (out / name).exists()]
    lines.append("written: " + ", ".join(written))
    return "\n".join(lines)


def _round_line(metrics: dict[str, Any]) -> str:
    parts = [
        f"round {metrics['round']}: kept {metrics['n_kept']}, dropped {metrics['n_dropped']} "
        f"of {metrics['n_pairs']}",
        f"train accuracy {_number(metrics.get('reward_accuracy'))}",
    ]
    if "eval_accuracy" in metrics:
        parts.append(f"eval accuracy {_number(metrics['eval_accuracy'])}")
    if "drop_precision" in metrics:
        precision, recall = metrics["drop_precision"], metrics["drop_recall"]
        auroc = metrics["flip_auroc"]
        parts.append(
            f"dropped flips: precision {_number(precision)}, recall {_number(recall)}, "
            f"flip AUROC {_number(auroc)}"
        )
    return "; ".join(parts)


def _final_line(metrics: dict[str, Any]) -> str:
    final = f"final: train accuracy {_number(metrics.get('reward_accuracy'))}"
    if "eval_accuracy" in metrics:
        final += f", eval accuracy {_number(metrics['eval_accuracy'])}"
    return final


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a" if value is None else str(value)
