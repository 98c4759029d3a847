"""What a run leaves behind for people and other tools to read.

After each round: one line per pair in `<out>/pairs.jsonl` (log-probs, margin, loss, weight, kept,
flipped), one summary line in `<out>/metrics.jsonl`, and the cleaned dataset (the kept pairs'
original records) as JSONL.
At the start: `<out>/run.json` with the resolved config, package versions, git revision and data
fingerprint, so every output describes how it was made.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ropo.data import PreferencePair, read_records
from ropo.filter.detection import auroc, drop_precision_recall, reward_accuracy
from ropo.filter.weights import DropDecision
from ropo.logps import PairLogps
from ropo.loss import preference_margin
from ropo.models.files import write_atomic
from ropo.run_dir import RunIdentity


def write_run_info(
    out: Path,
    identity: RunIdentity,
    resolved_config: dict[str, Any],
    data_fingerprint: str,
    data_report: str,
    eval_ids: Sequence[str] = (),
) -> None:
    """Write `<out>/run.json`: run id, input fingerprints (run_dir.py), config, versions, git
    revision, token fingerprint and counts of the data, and the ids that eval_split held out of
    the data (`eval_ids`). A resume keeps the command that started the run and adds its own to
    `resumes`."""
    versions = {}
    for package in ("ropo", "torch", "sentencepiece", "safetensors", "numpy", "pyyaml", "tqdm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    started = identity.resumed_info or {}
    info = {
        "run_id": identity.run_id,
        "inputs": identity.inputs,
        "config": resolved_config,
        "versions": {"python": sys.version.split()[0], "platform": platform.platform(), **versions},
        "git_revision": _git_revision(),
        "data_fingerprint": data_fingerprint,
        "data_report": data_report,
        "eval_ids": list(eval_ids),
        "command": started.get("command", sys.argv),
        "resumes": started.get("resumes", []) + ([sys.argv] if started else []),
    }
    write_atomic(out / "run.json", json.dumps(info, indent=1))  # a resume reads it


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


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
