"""Held-out preference metrics: policy and reference log-probs of the same pairs in, numbers out.

Sits just after loss/ (it reuses the DPO loss and the implicit rewards): `ropo eval`
(eval_run.py), the held-out evaluation during training (train.py) and the built-in task's report
all compute their preference accuracy, margins and loss here. Log-probs are summed over response
tokens, as in training; "margin" is the policy-minus-reference log-ratio margin
(log pi/pi_ref of the chosen minus that of the rejected response), in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from ropo.logps import PairLogps
from ropo.loss import dpo_loss, implicit_rewards, preference_margin

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


@dataclass(frozen=True)
class HeldoutMetrics:
    """How a policy ranks held-out pairs against its reference; means are over the N pairs."""

    n_pairs: int
    accuracy: float  # share of pairs with margin > 0; a tie counts as wrong
    accuracy_ci95: tuple[float, float]  # Wilson score interval of the accuracy
    margin_mean: float  # nats
    reward_margin_mean: float  # beta * margin_mean
    chosen_reward_mean: float  # beta * (policy - reference) log-prob of the chosen response
    rejected_reward_mean: float  # the same for the rejected response
    loss_mean: float  # DPO loss -log sigmoid(beta * margin) at the given beta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def implicit_margins(policy: PairLogps, reference: PairLogps) -> Tensor:
    """(policy - reference) log-prob of chosen minus that of rejected, (N,), in nats."""
    return preference_margin(policy.chosen, policy.rejected, reference.chosen, reference.rejected)


def preference_accuracy(margins: Tensor) -> float:
    """Share of pairs with margin > 0. A tie counts as wrong, so the reference against itself
    gets 0, not 1/2; NaN for no pairs."""
    n = margins.numel()
    return int((margins > 0).sum()) / n if n else math.nan


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval (low, high) of a proportion successes/n (Wilson 1927).

    Unlike the normal approximation p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not of
    width 0 at p = 0 or 1: center (p + z²/2n) / (1 + z²/n), half-width
    z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²). (NaN, NaN) for n = 0.
    """
    if n == 0:
        return math.nan, math.nan
    p, zz = successes / n, z * z
    center = (p + zz / (2 * n)) / (1 + zz / n)
    half = z / (1 + zz / n) * math.sqrt(p * (1 - p) / n + zz / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def heldout_metrics(policy: PairLogps, reference: PairLogps, beta: float) -> HeldoutMetrics:
    """Accuracy (with its 95% interval), mean margin, rewards and DPO loss of N pairs.

    Per-pair values are float32, as in training's audit; the means are taken in float64.
    """
    margins = implicit_margins(policy, reference)  # (N,)
    logps = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    chosen_rewards, rejected_rewards = implicit_rewards(*logps, beta)  # (N,) each
    losses = dpo_loss(margins, beta)  # (N,)
    mean = lambda values: values.double().mean().item()  # noqa: E731
    return HeldoutMetrics(
        n_pairs=margins.numel(),
        accuracy=preference_accuracy(margins),
        accuracy_ci95=wilson_interval(int((margins > 0).sum()), margins.numel()),
        margin_mean=mean(margins),
        reward_margin_mean=beta * mean(margins),
        chosen_reward_mean=mean(chosen_rewards),
        rejected_reward_mean=mean(rejected_rewards),
        loss_mean=mean(losses),
    )


def per_pair_records(
    ids: Sequence[str], policy: PairLogps, reference: PairLogps, beta: float
) -> list[dict[str, Any]]:
    """One record per pair: id, margin, reward_margin (beta * margin), chosen_reward and
    rejected_reward (beta * (policy - reference) log-prob of each response)."""
    margins = implicit_margins(policy, reference).tolist()
    chosen_rewards, rejected_rewards = implicit_rewards(
        policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta
    )
    return [
        {
            "id": pair_id,
            "margin": margin,
            "reward_margin": beta * margin,
            "chosen_reward": chosen,
            "rejected_reward": rejected,
        }
        for pair_id, margin, chosen, rejected in zip(
            ids, margins, chosen_rewards.tolist(), rejected_rewards.tolist(), strict=True
        )
    ]
