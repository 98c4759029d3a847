"""Tokenised pairs -> padded batches -> summed response log-probs.

Sits between the data and the losses: `collate_pairs` puts the chosen and rejected rows of a batch
into one right-padded tensor (one forward for both), and `response_logps` turns the model's hidden
states into per-sequence log-probs of the response tokens.

Notation: B pairs, R = 2B rows (chosen rows first, then rejected), T padded length, C model width,
V vocabulary, M number of response tokens in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ropo.data import TokenizedPair
from ropo.models.llama import Transformer


@dataclass
class PreferenceBatch:
    """B pairs as 2B right-padded rows: rows [0, B) are chosen, rows [B, 2B) rejected."""

    ids: list[str]
    input_ids: Tensor  # (R, T) long
    attention_mask: Tensor  # (R, T) 1 = real token
    response_mask: Tensor  # (R, T) 1 where the token at t belongs to the response (label side)

    @property
    def num_pairs(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            self.ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
        )


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


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> PreferenceBatch:
    """B pairs as one (2B, T) batch, chosen rows first, so that one forward serves both."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return PreferenceBatch([p.id for p in pairs], *collate_sequences(prompts, responses, pad_id))


def response_logps(model: Transformer, batch: PreferenceBatch) -> PairLogps:
    """Summed fp32 log-probs of the chosen and rejected responses of `batch`, (B,) each."""
    sums, counts = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    B = batch.num_pairs
    return PairLogps(sums[:B], sums[B:], counts[:B], counts[B:])


def sequence_logps(
    model: Transformer,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the response tokens of each row, (R,), and their count, (R,).

    The LM head and log-softmax run only at the M positions that predict a response token, in
    chunks of `chunk_tokens`, and each chunk is recomputed in backward instead of kept: the full
    (R, T, V) logits are never materialised.
    """
    # Rows are right-padded, so under causal attention no real token can see a pad: the padding
    # mask changes only the pad positions' outputs, which are never read. Leaving it out selects
    # SDPA's is_causal (flash) kernel. `attention_mask` still documents the batch's real length.
    del attention_mask
    hidden = model.hidden_states(input_ids)  # (R, T, C)
    # The hidden state at t predicts token t+1: select positions on the label side after the shift,
    # so the first response token (predicted from the last prompt position) counts.
    label_mask = response_mask[:, 1:]  # (R, T-1)
    rows = torch.nonzero(label_mask, as_tuple=True)[0]  # (M,) which row each token is in
    targets = input_ids[:, 1:][label_mask]  # (M,)
    selected = hidden[:, :-1][label_mask]  # (M, C)
    token_logps = torch.cat(
        [
            _chunk_logps(
                model.output.weight, selected[i : i + chunk_tokens], targets[i : i + chunk_tokens]
            )
            for i in range(0, selected.shape[0], chunk_tokens)
        ]
    )  # (M,)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device)
    sums = sums.index_add(0, rows, token_logps)  # (R,)
    return sums, label_mask.sum(dim=1).to(torch.float32)


def _token_logps(head_weight: Tensor, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = (hidden @ head_weight.T).float()  # (m, V)
    # log p(target) = logit[target] - logsumexp(logits), both in fp32 (bf16 logsumexp is unstable)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _chunk_logps(head_weight: Tensor, hidden: Tensor, targets: Tensor) -> Tensor:
    if torch.is_grad_enabled() and hidden.requires_grad:
        return checkpoint(_token_logps, head_weight, hidden, targets, use_reentrant=False)
    return _token_logps(head_weight, hidden, targets)


@torch.inference_mode()
def score_pairs(
    model: Transformer,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    desc: str = "scoring",
) -> PairLogps:
    """Summed response log-probs of every pair, (N,) each, in eval mode without autograd.

    Pairs are scored in length order so that each batch pads to similar lengths; the result is in
    the order of `pairs`.
    """
    from tqdm.auto import tqdm  # progress bars only where the long passes run

    was_training = model.training
    model.eval()
    device = model.output.weight.device
    order = sorted(range(len(pairs)), key=lambda i: _pair_length(pairs[i]))
    parts: list[tuple[list[int], PairLogps]] = []
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=len(starts) < 4):
        index = order[start : start + batch_size]
        batch = collate_pairs([pairs[i] for i in index], pad_id).to(device)
        parts.append((index, response_logps(model, batch)))
    model.train(was_training)
    return _reorder(parts, len(pairs))


def _pair_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def _reorder(parts: list[tuple[list[int], PairLogps]], n: int) -> PairLogps:
    fields = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")
    out = {name: torch.zeros(n, dtype=torch.float32) for name in fields}
    for index, logps in parts:
        where = torch.tensor(index, dtype=torch.long)
        for name in fields:
            out[name][where] = getattr(logps, name).float().cpu()
    return PairLogps(**out)
