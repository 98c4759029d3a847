"""A sweep's runs (or a demo's) summarised per method and flip rate η with stats.py: mean gold
reward, the paired difference to DPO at the same η, the share of the noise damage recovered,
and how well the filter found the flipped pairs. The report and the tables render the result.

Pairing: a method's run with seed s meets DPO's run with seed s at the same η (same flipped
labels and batch order) and clean DPO's run with seed s (DPO at η = 0); only seeds that all the
runs of a comparison have are used. Every run is scored on the same held-out prompts.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ropo_builtin.stats import (
    Interval,
    Resamples,
    draw_resamples,
    mean_interval,
    paired_difference,
    recovered_share,
)

Runs = dict[tuple[str, float], dict[int, dict[str, Any]]]  # (method, η) -> seed -> results row


def group_runs(runs: list[dict[str, Any]]) -> Runs:
    """The runs keyed by (method, noise), then by seed; dpo_clean counts as DPO at η = 0."""
    groups: Runs = defaultdict(dict)
    for run in runs:
        clean = run["method"] == "dpo_clean"
        groups[("dpo", 0.0) if clean else (run["method"], run["noise"])][run["seed"]] = run
    return groups


def rewards_matrix(group: dict[int, dict[str, Any]], seeds: list[int]) -> Tensor:
    """Per-prompt gold rewards of the runs with `seeds`, (S, P), rows in the order of `seeds`."""
    return torch.tensor([group[seed]["prompt_rewards"] for seed in seeds], dtype=torch.float64)


def cell_statistics(groups: Runs, method: str, noise: float) -> dict[str, Any]:
    """The statistics of one (method, η): mean gold reward with its 95% interval, the paired
    difference to DPO at η (`beats_dpo` when its interval is above 0), the recovered share of
    the noise damage (against clean DPO, η > 0 only) and the filter's per-round numbers."""
    own = groups[(method, noise)]
    seeds = sorted(own)
    cell: dict[str, Any] = {"method": method, "noise": noise, "seeds": seeds}
    cell["gold_reward"] = _interval(mean_interval, [own], seeds)
    dpo, clean = groups.get(("dpo", noise), {}), groups.get(("dpo", 0.0), {})
    paired = sorted(set(seeds) & set(dpo)) if method != "dpo" else []
    cell["vs_dpo"] = _interval(paired_difference, [own, dpo], paired) if paired else None
    cell["beats_dpo"] = bool(cell["vs_dpo"] and cell["vs_dpo"]["low"] > 0)
    triple = sorted(set(paired) & set(clean)) if noise > 0 else []
    cell["recovered"] = _interval(recovered_share, [own, dpo, clean], triple) if triple else None
    cell["filtering"] = filtering_rounds(list(own.values()))
    return cell


def _interval(statistic: Any, groups: list[dict[int, dict[str, Any]]], seeds: list[int]) -> Any:
    """`statistic` (a stats.py function of (S, P) matrices and resamples) as a dict, or None."""
    matrices = [rewards_matrix(group, seeds) for group in groups]
    resamples = _resamples(len(seeds), matrices[0].shape[1])
    interval: Interval | None = statistic(*matrices, resamples)
    return interval.to_dict() if interval is not None else None


@functools.lru_cache(maxsize=4)
def _resamples(n_seeds: int, n_prompts: int) -> Resamples:
    """The same seeded resamples for every comparison of a sweep: drawing them once is most of
    the time the statistics take."""
    return draw_resamples(n_seeds, n_prompts)


def filtering_rounds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round, averaged over the runs (seeds) of one method and η: the true share of flipped
    pairs, the estimated one (rho=auto), the share dropped, and the dropped set's precision and
    recall as a detector of flipped pairs. Empty for a method that drops nothing."""
    if not any(r["n_dropped"] for run in runs for r in run["rounds"]):
        return []
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        for summary in run["rounds"]:
            by_round[summary["round"]].append(summary)
    rounds = []
    for round_idx, rows in sorted(by_round.items()):
        rounds.append(
            {
                "round": round_idx,
                "flipped_share": _mean([r["n_flipped"] / r["n_pairs"] for r in rows]),
                "noise_estimate": _mean([r.get("noise_estimate") for r in rows]),
                "dropped_share": _mean([r["n_dropped"] / r["n_pairs"] for r in rows]),
                "drop_precision": _mean([r["drop_precision"] for r in rows]),
                "drop_recall": _mean([r["drop_recall"] for r in rows]),
            }
        )
    return rounds


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def sweep_statistics(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """cell_statistics of every (method, η) of `runs`, in the order the runs first appear."""
    groups = group_runs(runs)
    return [cell_statistics(groups, method, noise) for method, noise in groups]
