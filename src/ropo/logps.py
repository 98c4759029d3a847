"""Summed response log-probs, the quantity every loss in ROPO is written in.

Sits between the model and the losses. For a response y to a prompt x,
    log pi(y | x) = sum over response tokens t of log softmax(logits at t - 1)[y_t],
EOS included, summed (not averaged) in fp32. `pair_logps` computes it for the chosen and the
rejected response of each pair: shift, mask, gather, sum. Training and scoring compute the same
numbers faster in logps_fused.py; tests/test_logps.py checks that the two agree.

Notation: B pairs, R rows, T padded length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ropo.data import TokenizedPair
from ropo.models.llama import Transformer


def pair_logps(model: Transformer, pairs: Sequence[TokenizedPair], pad_id: int) -> PairLogps:
    """Summed log-probs of each pair's chosen and rejected response, (B,) each, with their
    lengths. Each response is a row of its own, [prompt | response | pad]."""
    B = len(pairs)
    prompts = [pair.prompt_ids for pair in pairs] * 2
    responses = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    input_ids, _, response_mask = collate_sequences(prompts, responses, pad_id)  # (2B, T) each
    device = model.output.weight.device
    input_ids, response_mask = input_ids.to(device), response_mask.to(device)
    # Right padding: under the causal mask no real token reads a pad, so no padding mask.
    logits = model(input_ids).float()  # (2B, T, V)
    # Shift: the logits at t predict token t + 1.
    logits, labels, is_response = logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:]
    all_logps = logits.log_softmax(dim=-1)  # (2B, T-1, V)
    token_logps = all_logps.gather(-1, labels[..., None]).squeeze(-1)  # (2B, T-1)
    sums = (token_logps * is_response).sum(dim=-1)  # (2B,): response tokens only
    lengths = is_response.sum(dim=-1).float()  # (2B,)
    return PairLogps(sums[:B], sums[B:], lengths[:B], lengths[B:])


@dataclass
class PairLogps:
    """Per-pair log-probs of the two responses, shape (B,) each, plus response lengths in tokens."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def to(self, device: torch.device | str) -> PairLogps:
        return PairLogps(
            self.chosen.to(device),
            self.rejected.to(device),
            self.chosen_tokens.to(device),
            self.rejected_tokens.to(device),
        )

    def mean(self) -> PairLogps:
        """Length-averaged log-probs (IPO's convention)."""
        return PairLogps(
            self.chosen / self.chosen_tokens,
            self.rejected / self.rejected_tokens,
            self.chosen_tokens,
            self.rejected_tokens,
        )


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    pad_to_multiple: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad prompt+response rows into (input_ids, attention_mask, response_mask), each (R, T).

    Right padding keeps positions 0..n-1 for every row, so no position ids are needed. The padded
    length is rounded up to `pad_to_multiple`, which keeps matmul shapes friendly.
    """
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        n = len(prompt) + len(response)
        input_ids[r, :n] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[r, :n] = 1
        response_mask[r, len(prompt) : n] = True
    return input_ids, attention_mask, response_mask
