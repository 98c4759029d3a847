"""The sampling stage of a round: new pairs for the prompts of dropped pairs (filter/rejection.py),
the line each writes to <out>/sampled_pairs.jsonl, and their reference log-probs for the next
round. Sits after the filter and before the audit; train.py calls it between rounds.
"""

from __future__ import annotations

from typing import Any

import torch

from ropo.data import TokenizedPair
from ropo.filter.rejection import SampledPair, SamplingSettings, rejection_sample
from ropo.logps import PairLogps
from ropo.models.llama import Transformer
from ropo.models.tokenizer import Tokenizer
from ropo.ref_cache import RefLogps


def sample_replacements(
    policy: Transformer,
    reference: Transformer,
    dropped: list[TokenizedPair],
    round_idx: int,
    settings: SamplingSettings,
    tokenizer: Tokenizer,
) -> list[SampledPair]:
    """Rejection-sampled pairs for the prompts of `dropped`, the pairs round `round_idx` dropped;
    `reference` scores the new responses. The policy is left in training mode."""
    result = rejection_sample(policy, reference, dropped, round_idx, settings, tokenizer)
    policy.train()
    print(
        f"rejection sampling: {len(result.pairs)} new pairs for {len(dropped)} dropped pairs "
        f"(skipped: {result.skipped})"
    )
    return result.pairs


def sampled_record(pair: SampledPair, tokenizer: Tokenizer) -> dict[str, Any]:
    """The pair's line in sampled_pairs.jsonl: its ids and reference log-probs, and for people
    its responses' text (decoding drops special tokens, so the next round trains on the ids)."""
    return pair.to_record() | {
        "chosen": tokenizer.decode(list(pair.tokens.chosen_ids)),
        "rejected": tokenizer.decode(list(pair.tokens.rejected_ids)),
    }


def sampled_ref_logps(pairs: list[SampledPair]) -> RefLogps:
    """Reference log-probs of sampled pairs (computed when they were sampled), by pair id."""
    logps = PairLogps(
        torch.tensor([pair.ref_chosen_logp for pair in pairs]),
        torch.tensor([pair.ref_rejected_logp for pair in pairs]),
        torch.tensor([float(len(pair.tokens.chosen_ids)) for pair in pairs]),
        torch.tensor([float(len(pair.tokens.rejected_ids)) for pair in pairs]),
    )
    return RefLogps([pair.tokens.id for pair in pairs], logps, "sampled")
