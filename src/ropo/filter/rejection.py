"""Robustness-guided rejection sampling: new pairs for the prompts whose pairs were dropped.

After a round's w-step, every prompt of a dropped pair gets K responses sampled from the current
policy. Each response is scored by its implicit reward r(y) = beta * log(pi_theta(y|x) /
pi_ref(y|x)) (summed log-probs), and the pair (highest reward, lowest reward) - the candidate pair
the model is most confident about, hence the one with the lowest ROPO loss - joins the next
round's training set. (ROPO paper, Sec. "rejection sampling"; our reconstruction of the details.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ropo.data import TokenizedPair
from ropo.faults import maybe_crash
from ropo.logps import PairLogps, collate_sequences, sequence_logps
from ropo.models.llama import Transformer
from ropo.models.sample import generate
from ropo.progress import progress_bar


@dataclass
class SampledPairs:
    """Pairs built from policy samples, with the log-probs used to pick them (B,) each."""

    pairs: list[TokenizedPair]
    policy: PairLogps
    reference: PairLogps
    skipped: dict[str, int] = field(default_factory=dict)


def rejection_sample(
    policy: Transformer,
    reference: Transformer,
    dropped: Sequence[TokenizedPair],
    round_idx: int,
    k: int,
    beta: float,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    vocab_limit: int | None = None,
    prompts_per_batch: int = 8,
) -> SampledPairs:
    """One new pair per distinct prompt of `dropped`, id "<pair id>@rs<round>".

    Prompts whose K samples are all identical give no pair and are counted in `skipped`.
    """
    unique = list({pair.prompt_ids: pair for pair in dropped}.values())
    pairs, picked_policy, picked_ref = [], [], []
    skipped = {"identical_samples": 0}
    for start in progress_bar(
        range(0, len(unique), prompts_per_batch),
        desc="rejection sampling",
        unit="batch",
        leave=False,
    ):
        group = unique[start : start + prompts_per_batch]
        prompts = [list(pair.prompt_ids) for pair in group for _ in range(k)]
        samples = generate(
            policy,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=eos_id,
            pad_id=pad_id,
            generator=generator,
            vocab_limit=vocab_limit,
        )
        maybe_crash("rejection_sampling")
        samples = [s if s else [eos_id] for s in samples]  # an empty sample is just "stop"
        batch = collate_sequences(prompts, samples, pad_id)
        batch = [t.to(policy.output.weight.device) for t in batch]
        with torch.inference_mode():
            policy_logps, _ = sequence_logps(policy.eval(), *batch)
            ref_logps, _ = sequence_logps(reference.eval(), *batch)
        rewards = (beta * (policy_logps - ref_logps)).view(len(group), k)  # (G, K)
        for g, source in enumerate(group):
            best, worst = rewards[g].argmax().item(), rewards[g].argmin().item()
            chosen, rejected = samples[g * k + best], samples[g * k + worst]
            if chosen == rejected:
                skipped["identical_samples"] += 1
                continue
            pairs.append(
                TokenizedPair(
                    f"{source.id}@rs{round_idx}", source.prompt_ids, tuple(chosen), tuple(rejected)
                )
            )
            rows = torch.tensor([g * k + best, g * k + worst])
            picked_policy.append(policy_logps[rows].float().cpu())
            picked_ref.append(ref_logps[rows].float().cpu())
    return SampledPairs(
        pairs, _as_pair_logps(picked_policy, pairs), _as_pair_logps(picked_ref, pairs), skipped
    )


def _as_pair_logps(picked: list[torch.Tensor], pairs: list[TokenizedPair]) -> PairLogps:
    stacked = torch.stack(picked) if picked else torch.zeros(0, 2)  # (B, 2): chosen, rejected
    chosen_tokens = torch.tensor([float(len(p.chosen_ids)) for p in pairs])
    rejected_tokens = torch.tensor([float(len(p.rejected_ids)) for p in pairs])
    return PairLogps(stacked[:, 0], stacked[:, 1], chosen_tokens, rejected_tokens)
