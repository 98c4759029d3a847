"""How good a policy is on the held-out prompts, judged by the gold reward.

Fifth stage (stages.py): a policy's greedy responses (written by `ropo generate`) are scored per
prompt; a method at one noise rate is summarised over its training seeds with a percentile
bootstrap over prompts. Pure functions of rewards; the report (report.py) prints them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ropo_constraints.constraints import gold_reward, satisfied
from ropo_constraints.prompts import PromptSpec


def score_responses(specs: list[PromptSpec], responses: list[str]) -> dict:
    """Per-prompt gold rewards and whether each response obeys every constraint, with the mean
    reward and its 95% bootstrap interval over prompts."""
    rewards = [gold_reward(s.constraints, r) for s, r in zip(specs, responses, strict=True)]
    obeys = [
        all(satisfied(c, r) for c in s.constraints) for s, r in zip(specs, responses, strict=True)
    ]
    low, high = bootstrap_ci(rewards)
    return {
        "mean": float(np.mean(rewards)),
        "ci_low": low,
        "ci_high": high,
        "obeys_all": float(np.mean(obeys)),
        "per_prompt": rewards,
    }


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling them with replacement,
    `n_resamples` times, from a fixed seed so that a report is reproducible)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarise_cell(runs: list[dict]) -> dict:
    """One method at one noise rate over its seeds: the mean reward of the prompts' seed-averaged
    rewards with its bootstrap interval over prompts, and the spread of the seeds' means.

    `runs` are score_responses results (one per seed) on the same held-out prompts.
    """
    per_prompt = np.mean([run["per_prompt"] for run in runs], axis=0)  # (prompts,)
    seed_means = [run["mean"] for run in runs]
    low, high = bootstrap_ci(per_prompt)
    return {
        "mean": float(per_prompt.mean()),
        "ci_low": low,
        "ci_high": high,
        "obeys_all": float(np.mean([run["obeys_all"] for run in runs])),
        "seeds": len(runs),
        "seed_sd": float(np.std(seed_means, ddof=1)) if len(runs) > 1 else None,
    }
