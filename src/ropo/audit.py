"""What a run leaves behind for people and other tools to read, after each round.

One line per pair in `<out>/pairs.jsonl` (log-probs, margin, loss, weight, kept, flipped), one
summary line in `<out>/metrics.jsonl`, and the cleaned dataset (the kept pairs' original records)
as JSONL. The last stage of the data flow; train.py appends the lines (jsonl.py). What a run was
made from (`<out>/run.json`: config, versions, git revision) is run_info.py's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ropo.data import PreferencePair
from ropo.filter.detection import auroc, drop_precision_recall, reward_accuracy
from ropo.filter.weights import DropDecision
from ropo.jsonl import read_records
from ropo.logps import PairLogps
from ropo.loss import preference_margin
from ropo.models.files import write_atomic


def pair_records(
    round_number: int,
    ids: Sequence[str],
    policy: PairLogps,
    reference: PairLogps,
    losses: Tensor,
    decision: DropDecision,
    beta: float,
    flips: Mapping[str, bool] | None,
) -> list[dict[str, Any]]:
    """One audit record per pair (the fields documented in the README); rounds count from 1."""
    margins = preference_margin(
        policy.chosen, policy.rejected, reference.chosen, reference.rejected
    )
    weights = decision.weights.tolist()
    records = []
    for i, pair_id in enumerate(ids):
        records.append(
            {
                "id": pair_id,
                "round": round_number,
                "policy_chosen_logp": policy.chosen[i].item(),
                "policy_rejected_logp": policy.rejected[i].item(),
                "ref_chosen_logp": reference.chosen[i].item(),
                "ref_rejected_logp": reference.rejected[i].item(),
                "margin": margins[i].item(),
                "reward_margin": beta * margins[i].item(),
                "loss": losses[i].item(),
                "weight": weights[i],
                "kept": weights[i] > 0,
                "flipped": None if flips is None else bool(flips[pair_id]),
            }
        )
    return records


def round_metrics(
    round_number: int,
    records: Sequence[dict[str, Any]],
    decision: DropDecision,
    flips: Mapping[str, bool] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Summary of one round: losses, reward accuracy and, when flips are known, detection quality.

    reward accuracy = share of pairs whose policy-vs-reference margin is strictly positive.
    """
    losses = torch.tensor([r["loss"] for r in records])
    margins = torch.tensor([r["margin"] for r in records])
    kept = torch.tensor([r["kept"] for r in records])
    summary: dict[str, Any] = {
        "round": round_number,
        "n_pairs": len(records),
        "n_kept": decision.n_keep,
        "n_dropped": len(records) - decision.n_keep,
        "loss_mean": losses.mean().item(),
        "loss_kept_mean": _mean(losses[kept]),
        "loss_dropped_mean": _mean(losses[~kept]),
        "margin_mean": margins.mean().item(),
        "reward_accuracy": reward_accuracy(margins),
        **extra,
    }
    if flips is not None:
        flipped = torch.tensor([flips[r["id"]] for r in records])
        precision, recall = drop_precision_recall(decision.dropped_ids, flips)
        summary.update(
            {
                "n_flipped": int(flipped.sum()),
                "drop_precision": precision,
                "drop_recall": recall,
                "flip_auroc": auroc((-margins).tolist(), flipped.tolist()),
                "reward_accuracy_clean": reward_accuracy(margins[~flipped]),
                "reward_accuracy_flipped": reward_accuracy(margins[flipped]),
            }
        )
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


def format_metrics(metrics: dict[str, Any]) -> str:
    """One terminal line per round."""
    shown = [
        "n_kept",
        "loss_mean",
        "reward_accuracy",
        "eval_accuracy",
        "drop_precision",
        "drop_recall",
        "flip_auroc",
    ]
    parts = [f"{k}={_fmt(metrics[k])}" for k in shown if k in metrics]
    return f"round {metrics['round']}: " + " ".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def export_cleaned(
    path: Path,
    pairs: Sequence[PreferencePair],
    kept_ids: Sequence[str],
    flips: Mapping[str, bool] | None = None,
) -> None:
    """The kept pairs as their original input records, in file order: every field, untemplated,
    in the input's format, so the file is input for any DPO trainer that read the original.

    Each record gains `ropo_id` (its id in the audit files) and, with injected noise,
    `ropo_flipped`: whether training saw its chosen and rejected swapped. The record keeps the
    input's labels either way; the flips are a simulation, not data. Records are read again from
    the data file by each pair's "file:line" source.
    """
    kept = set(kept_ids)
    wanted = {pair.source: pair.id for pair in pairs if pair.id in kept}  # "file:line" -> id
    files = dict.fromkeys(source.rsplit(":", 1)[0] for source in wanted)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            for file in files:
                for where, record in read_records(Path(file)):
                    pair_id = wanted.pop(where, None)
                    if pair_id is None:
                        continue
                    record["ropo_id"] = pair_id
                    if flips is not None:
                        record["ropo_flipped"] = bool(flips[pair_id])
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        if wanted:
            raise ValueError(
                f"{next(iter(wanted))}: this pair's line is no longer in the data file, which "
                "changed during the run; restore it and resume the run"
            )

    write_atomic(path, write)  # never a cut-short file that looks complete


def _mean(values: Tensor) -> float:
    return values.mean().item() if values.numel() else float("nan")
