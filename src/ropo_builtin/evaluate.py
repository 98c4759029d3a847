"""Stage 6 of the built-in pipeline: how good is a trained policy, judged by the gold reward.

In: a policy, the SFT model (baseline and reference), held-out prompts and clean held-out pairs;
the training loop's audit file. Out: plain floats for results.json and the report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ropo import evaluate as heldout
from ropo.data import PreferencePair, tokenize_pairs
from ropo.filter.detection import auroc, drop_precision_recall
from ropo.logps import PairLogps
from ropo.logps_fused import score_pairs
from ropo.models import Tokenizer, Transformer, load_model, load_tokenizer
from ropo_builtin.pairs import sample_responses
from ropo_builtin.sorting import correct_response, gold_reward


@dataclass(frozen=True)
class PolicyScores:
    """A policy on the held-out prompts; win rate and accuracy are None for the SFT model itself."""

    gold_reward: float  # mean gold reward of sampled responses
    gold_reward_se: float  # its standard error over prompts
    exact_match: float  # share of sampled responses that are exactly the sorted list
    win_rate: float | None  # against SFT samples under the gold reward, ties count 1/2
    preference_accuracy: float | None  # clean held-out pairs whose implicit-reward margin is > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_rewards(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    desc: str,
) -> tuple[list[list[float]], list[list[bool]]]:
    """Gold rewards (and exact-match flags) of n samples per prompt, [prompt][sample]."""
    responses = sample_responses(
        model, tokenizer, prompts, n, temperature, max_new_tokens, seed, desc=desc
    )
    rewards = [[gold_reward(p, r) for r in rs] for p, rs in zip(prompts, responses, strict=True)]
    exact = [
        [r.split() == correct_response(p).split() for r in rs]
        for p, rs in zip(prompts, responses, strict=True)
    ]
    return rewards, exact


def win_rate(
    policy_rewards: Sequence[Sequence[float]], baseline_rewards: Sequence[Sequence[float]]
) -> float:
    """Share of (prompt, sample) slots where the policy's sample beats the baseline's; a tie is 1/2.

    Sample j of the policy meets sample j of the baseline on the same prompt.
    """
    outcomes = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for ps, bs in zip(policy_rewards, baseline_rewards, strict=True)
        for a, b in zip(ps, bs, strict=True)
    ]
    return sum(outcomes) / len(outcomes)


def heldout_logps(
    model: Transformer, tokenizer: Tokenizer, pairs: list[PreferencePair]
) -> PairLogps:
    """Summed response log-probs of both responses of every held-out pair, (N,) each."""
    tokens, _ = tokenize_pairs(pairs, tokenizer, max_length=1024)
    assert len(tokens) == len(pairs), "held-out pairs must tokenise without being dropped"
    return score_pairs(
        model, tokens, batch_size=256, pad_id=tokenizer.pad_id, desc="held-out pairs"
    )


def preference_accuracy(policy: PairLogps, reference: PairLogps) -> float:
    """Share of pairs with implicit-reward margin (policy - reference, chosen - rejected) > 0,
    computed as `ropo eval` and the held-out evaluation of `ropo train` do (ropo/evaluate.py).

    A tie counts as wrong, so the reference scored against itself gets 0, not 1/2.
    """
    return heldout.preference_accuracy(heldout.implicit_margins(policy, reference))


def mean(values: Sequence[Sequence[float]] | Sequence[Sequence[bool]]) -> float:
    flat = [float(v) for row in values for v in row]
    return sum(flat) / len(flat)


def prompt_means(values: Sequence[Sequence[float]]) -> list[float]:
    """The mean over each prompt's samples, [prompt]."""
    return [sum(row) / len(row) for row in values]


def standard_error(values: Sequence[Sequence[float]]) -> float:
    """Standard error of the mean over prompts (a prompt's samples are averaged first)."""
    per_prompt = torch.tensor(prompt_means(values), dtype=torch.float64)
    if per_prompt.numel() < 2:
        return float("nan")
    return (per_prompt.std() / math.sqrt(per_prompt.numel())).item()


class Judge:
    """The SFT side of every comparison, computed once: its samples' gold rewards on the held-out
    prompts and its log-probs of the held-out pairs (the reference of the implicit reward).

    Every policy is sampled with the same seed as the SFT model, so that win rates compare the
    models on shared random numbers rather than on sampling luck.
    """

    def __init__(
        self,
        sft_dir: Path,
        prompts: list[str],
        pairs: list[PreferencePair],
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.prompts, self.pairs, self.device = prompts, pairs, device
        self.sample_args = (n, temperature, max_new_tokens, seed)
        self.tokenizer = load_tokenizer(sft_dir)
        sft = load_model(sft_dir, device=device)
        self.sft_rewards, exact = sample_rewards(
            sft, self.tokenizer, prompts, *self.sample_args, desc="evaluating sft"
        )
        self.sft_scores = PolicyScores(
            mean(self.sft_rewards), standard_error(self.sft_rewards), mean(exact), None, None
        )
        self.sft_prompt_rewards = prompt_means(self.sft_rewards)
        self.reference = heldout_logps(sft, self.tokenizer, pairs)

    def score(self, model_dir: Path, name: str) -> tuple[PolicyScores, list[float]]:
        """Gold reward, exact-match rate, win rate against SFT and held-out preference accuracy;
        and the mean gold reward of each prompt's samples, in prompt order."""
        policy = load_model(model_dir, device=self.device)
        rewards, exact = sample_rewards(
            policy, self.tokenizer, self.prompts, *self.sample_args, desc=f"evaluating {name}"
        )
        accuracy = preference_accuracy(
            heldout_logps(policy, self.tokenizer, self.pairs), self.reference
        )
        scores = PolicyScores(
            mean(rewards),
            standard_error(rewards),
            mean(exact),
            win_rate(rewards, self.sft_rewards),
            accuracy,
        )
        return scores, prompt_means(rewards)


def noise_identification(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round of a training audit (pairs.jsonl records): how well the dropped set and the loss
    pick out the flipped pairs, and the mean margin of clean and of flipped pairs.

    precision = flipped among dropped / dropped, recall = flipped among dropped / flipped,
    loss AUROC = chance a flipped pair has a higher loss than a clean one (ties 1/2).
    """
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_round[record["round"]].append(record)
    summary = []
    for round_idx in sorted(by_round):
        rows = by_round[round_idx]
        flips = {r["id"]: bool(r["flipped"]) for r in rows}
        dropped = [r["id"] for r in rows if not r["kept"]]
        precision, recall = drop_precision_recall(dropped, flips)
        summary.append(
            {
                "round": round_idx,
                "n_pairs": len(rows),
                "n_flipped": sum(flips.values()),
                "n_dropped": len(dropped),
                "drop_precision": _none_if_nan(precision),
                "drop_recall": _none_if_nan(recall),
                "loss_auroc": _none_if_nan(auroc([r["loss"] for r in rows], list(flips.values()))),
                "margin_clean": _mean_or_none([r["margin"] for r in rows if not r["flipped"]]),
                "margin_flipped": _mean_or_none([r["margin"] for r in rows if r["flipped"]]),
            }
        )
    return summary


def with_noise_estimates(
    rounds: list[dict[str, Any]], metrics: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`rounds` (noise_identification) with each round's `noise_estimate` (the flip rate a
    rho=auto run estimated) and `rho_used` (the share it dropped) from its metrics.jsonl lines;
    None where the run wrote none (a fixed rho)."""
    by_round = {line["round"]: line for line in metrics}
    return [
        {
            **summary,
            "noise_estimate": by_round.get(summary["round"], {}).get("noise_estimate"),
            "rho_used": by_round.get(summary["round"], {}).get("rho_used"),
        }
        for summary in rounds
    ]


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value
