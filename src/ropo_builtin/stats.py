"""Paired bootstrap statistics of the built-in task: how sure are we that a method beats DPO?

In: per-prompt gold rewards (a prompt's samples averaged, evaluate.Judge) of several runs.
Out: means and differences with 95% confidence intervals. Pure functions; sweep_stats.py
applies them to a sweep's runs.

Notation: S seeds, P held-out prompts, B bootstrap resamples. A method's results form an (S, P)
matrix whose row s comes from its run with seed s. Rows of two methods with the same seed are
paired (same flipped labels, same batch order, same prompts), so a difference is taken row by
row before resampling. The bootstrap draws S seeds and P prompts with replacement, each
independently, and takes the mean over the drawn seed-prompt grid: it covers both the run-to-run
spread of training and the sampling of the prompts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with a bootstrap confidence interval [low, high]; ±inf where unbounded."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | None]:
        """The fields for a JSON file, an infinite bound as None (JSON has no infinity)."""
        return {k: v if math.isfinite(v) else None for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Resamples:
    """How often each seed and each prompt is drawn in each resample: (B, S) and (B, P)."""

    seed_counts: Tensor
    prompt_counts: Tensor


def draw_resamples(
    n_seeds: int, n_prompts: int, resamples: int = RESAMPLES, seed: int = 0
) -> Resamples:
    """B resamples of S seeds and P prompts, drawn with replacement from a seeded generator, so
    that the same call gives the same intervals."""
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(n_seeds, (resamples, n_seeds), generator=generator)
    prompts = torch.randint(n_prompts, (resamples, n_prompts), generator=generator)
    return Resamples(_counts(seeds, n_seeds), _counts(prompts, n_prompts))


def _counts(draws: Tensor, n: int) -> Tensor:
    """(B, k) drawn indices -> (B, n) times each index was drawn, float64."""
    counts = torch.zeros(draws.shape[0], n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def resampled_means(rewards: Tensor, resamples: Resamples) -> Tensor:
    """The mean of `rewards` (S, P) over each resample's seed-prompt grid, (B,)."""
    n_seeds, n_prompts = rewards.shape
    per_seed = resamples.prompt_counts @ rewards.double().T  # (B, S): drawn prompts summed
    return (per_seed * resamples.seed_counts).sum(1) / (n_seeds * n_prompts)


def percentile_interval(estimate: float, draws: Tensor, level: float = LEVEL) -> Interval:
    """The percentile bootstrap interval: the (1-level)/2 and (1+level)/2 quantiles of `draws`
    (nearest draw, so that infinite draws stay infinite rather than turn into nan)."""
    tail = (1 - level) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    low, high = torch.quantile(draws.double(), q, interpolation="nearest").tolist()
    return Interval(estimate, low, high)


def mean_interval(rewards: Tensor, resamples: Resamples) -> Interval:
    """Mean gold reward of an (S, P) matrix with its confidence interval."""
    return percentile_interval(rewards.double().mean().item(), resampled_means(rewards, resamples))


def paired_difference(method: Tensor, baseline: Tensor, resamples: Resamples) -> Interval:
    """Mean of method − baseline, both (S, P) with paired rows, with its confidence interval."""
    return mean_interval(method.double() - baseline.double(), resamples)


def recovered_share(
    method: Tensor, noisy: Tensor, clean: Tensor, resamples: Resamples
) -> Interval | None:
    """Share of the noise damage a method recovers, (method − noisy) / (clean − noisy), where
    noisy is DPO on the noisy labels and clean is DPO on clean labels (all (S, P), paired rows):
    0 = no better than noisy DPO, 1 = as good as clean DPO. Numerator and denominator are
    resampled together. None when the noise did no damage (clean ≤ noisy): nothing to recover.
    A resample in which it did none either counts as ±inf (the sign of its gain), which makes
    the interval unbounded when that happens often."""
    gain, damage = method.double() - noisy.double(), clean.double() - noisy.double()
    if damage.mean().item() <= 0:
        return None
    gains, damages = resampled_means(gain, resamples), resampled_means(damage, resamples)
    infinite = torch.where(gains >= 0, math.inf, -math.inf).double()
    draws = torch.where(damages > 0, gains / damages, infinite)
    return percentile_interval(gain.mean().item() / damage.mean().item(), draws)
