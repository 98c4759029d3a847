"""The fast road to logps.py's numbers: what training, scoring and SFT actually run.

A door you can skip: `response_logps` computes exactly what logps.pair_logps does (and
`sequence_logps` what it does for plain rows), to rounding, in less time and memory:
  - one row per pair, [prompt | chosen | rejected]: the prompt goes through the network once for
    both responses (`collate_pairs`, `shared_prompt_mask`), -19% step time with 64-token prompts;
  - the LM head and log-softmax only at the M positions that predict a response token, in
    chunks recomputed in backward (`_head_logps`): the (R, T, V) logits never exist;
  - the backward of log_softmax + gather written by hand (`TargetLogProbs`), -3%;
  - the mask in SDPA's additive form, made once for every layer (`attention_bias`).
tests/test_logps.py checks values and gradients against pair_logps; the timings come from
docs/performance.md.

Notation: B pairs, R rows, T padded length, C model width, V vocabulary, M number of response
tokens in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ropo.data import TokenizedPair
from ropo.logps import PairLogps
from ropo.models.llama import Transformer

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment ids of PreferenceBatch.segments


@dataclass
class PreferenceBatch:
    """B pairs, one right-padded row each: [prompt | chosen | rejected | pad], shape (B, T).

    Both responses read the prompt's keys, neither reads the other's, and the rejected positions
    restart after the prompt (`shared_prompt_mask`): each response sees exactly the context a row
    of its own would give it, and the prompt is computed once instead of twice.
    """

    ids: list[str]
    input_ids: Tensor  # (B, T) long
    positions: Tensor  # (B, T) RoPE position of every token
    segments: Tensor  # (B, T) PROMPT, CHOSEN, REJECTED or PAD
    predictors: Tensor  # (M,) flat index b * T + t of the hidden state that predicts each target
    targets: Tensor  # (M,) the response tokens, pair by pair, chosen before rejected
    owners: Tensor  # (M,) whose token: b for pair b's chosen response, B + b for its rejected one
    lengths: Tensor  # (2B,) float response lengths: chosen ones, then rejected ones

    @property
    def num_pairs(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> PreferenceBatch:
        tensors = (self.input_ids, self.positions, self.segments, self.predictors, self.targets)
        moved = [t.to(device) for t in (*tensors, self.owners, self.lengths)]
        return PreferenceBatch(self.ids, *moved)


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_id: int, pad_to_multiple: int = 8
) -> PreferenceBatch:
    """B pairs as one (B, T) batch of [prompt | chosen | rejected] rows; see PreferenceBatch."""
    B = len(pairs)
    longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), PAD, dtype=torch.long)
    predictors, slots, owners = [], [], []
    for b, pair in enumerate(pairs):
        P, C, R = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        if P == 0 or C == 0 or R == 0:
            raise ValueError(
                f"pair {pair.id}: prompt and both responses need a token (P={P}, C={C}, R={R})"
            )
        end = P + C + R
        input_ids[b, :end] = torch.tensor([*pair.prompt_ids, *pair.chosen_ids, *pair.rejected_ids])
        positions[b, : P + C] = torch.arange(P + C)
        positions[b, P + C : end] = torch.arange(P, P + R)  # as if right after the prompt
        segments[b, :P] = PROMPT
        segments[b, P : P + C] = CHOSEN
        segments[b, P + C : end] = REJECTED
        # The hidden state just before a token predicts it, within the token's own sequence: for
        # the first token of either response that is the prompt's last position.
        chosen_from = torch.arange(P - 1, P + C - 1)
        rejected_from = torch.cat([torch.tensor([P - 1]), torch.arange(P + C, P + C + R - 1)])
        predictors += [b * T + chosen_from, b * T + rejected_from]
        slots.append(b * T + torch.arange(P, end))
        owners += [torch.full((C,), b), torch.full((R,), B + b)]
    predictors, owners = torch.cat(predictors), torch.cat(owners)  # (M,) each
    targets = input_ids.flatten()[torch.cat(slots)]  # (M,)
    lengths = torch.bincount(owners, minlength=2 * B).to(torch.float32)
    return PreferenceBatch(
        [p.id for p in pairs], input_ids, positions, segments, predictors, targets, owners, lengths
    )


def shared_prompt_mask(segments: Tensor, positions: Tensor, sliding_window: int | None) -> Tensor:
    """(B, 1, T, T) bool, True where query t may read key s.

    Allowed: s <= t, s is no pad, s is in the prompt or in t's own response, and (Mistral) s is
    fewer than `sliding_window` positions back, counted in RoPE positions as in a row of its own.
    """
    T = segments.shape[1]
    slot = torch.arange(T, device=segments.device)
    query, key = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = (slot[None, :] <= slot[:, None]) & (key != PAD) & ((key == PROMPT) | (key == query))
    if sliding_window is not None:
        allowed &= positions[:, :, None] - positions[:, None, :] < sliding_window
    # Every query reads at least itself: one with no key would give NaN, which later layers would
    # spread through zero-weighted values into real rows. (Pad queries also read the prompt; their
    # outputs are never used.)
    return (allowed | (slot[None, :] == slot[:, None]))[:, None]  # (B, 1, T, T)


def attention_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool attention mask in SDPA's additive form: 0 where allowed, -inf elsewhere, in the
    queries' dtype. SDPA turns a bool mask into exactly this, but once per layer, and keeps each
    layer's copy for backward: 30 copies, 71 MB, at SmolLM2-135M's shape with 4 rows of 384."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))


def query_dtype(model: Transformer, device: torch.device) -> torch.dtype:
    """The dtype attention's queries will have: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.tok_embeddings.weight.dtype  # one dtype for every weight of the model


def response_logps(
    model: Transformer, batch: PreferenceBatch, chunk_tokens: int = 1024
) -> PairLogps:
    """logps.pair_logps for the pairs of `batch`: summed fp32 log-probs of the chosen and
    rejected responses, (B,) each, from one shared-prompt row per pair."""
    mask = shared_prompt_mask(batch.segments, batch.positions, model.config.sliding_window)
    bias = attention_bias(mask, query_dtype(model, batch.input_ids.device))
    hidden = model.hidden_states(batch.input_ids, positions=batch.positions, attn_mask=bias)
    selected = hidden.flatten(0, 1)[batch.predictors]  # (M, C)
    token_logps = _head_logps(model.output.weight, selected, batch.targets, chunk_tokens)  # (M,)
    B = batch.num_pairs
    sums = torch.zeros(2 * B, dtype=torch.float32, device=hidden.device)
    sums = sums.index_add(0, batch.owners, token_logps)  # (2B,)
    return PairLogps(sums[:B], sums[B:], batch.lengths[:B], batch.lengths[B:])


def sequence_logps(
    model: Transformer,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the response tokens of each row, (R,), and their count, (R,): what
    logps.pair_logps computes for each of its rows, for rows from logps.collate_sequences.

    The LM head and log-softmax run only at the M positions that predict a response token, in
    chunks of `chunk_tokens` (see `_head_logps`): the full (R, T, V) logits are never materialised.
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
    token_logps = _head_logps(model.output.weight, selected, targets, chunk_tokens)  # (M,)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device)
    sums = sums.index_add(0, rows, token_logps)  # (R,)
    return sums, label_mask.sum(dim=1).to(torch.float32)


def _token_logps(head_weight: Tensor, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = (hidden @ head_weight.T).float()  # (m, V), fp32: bf16 logsumexp is unstable
    return TargetLogProbs.apply(logits, targets)


class TargetLogProbs(torch.autograd.Function):
    """log_softmax(logits)[i, targets[i]], (m,), for logits (m, V), with a hand-written backward.

    d log p(y) / d logits = onehot(y) - softmax(logits). Autograd of log_softmax + gather would
    zero-fill an (m, V) gradient, scatter into it and read it back in log_softmax's backward;
    here the saved log-probs turn into the gradient in place: exp, times -g, plus g at y.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        logp = logits.log_softmax(dim=-1)  # (m, V)
        ctx.save_for_backward(logp, targets)
        return logp.gather(1, targets[:, None]).squeeze(1)  # (m,)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # In place on the saved tensor: a second backward through this graph would find its
        # version changed and raise, never read a gradient as log-probs.
        logp, targets = ctx.saved_tensors
        grad_logits = logp.exp_().mul_(-grad[:, None])  # -g * softmax, (m, V)
        grad_logits.scatter_add_(1, targets[:, None], grad[:, None])
        return grad_logits, None


def _head_logps(head_weight: Tensor, hidden: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """log p(target), (M,), for hidden (M, C): the LM head over chunks of `chunk_tokens` rows.

    With several chunks, each is recomputed in backward instead of kept, so one chunk's (m, V)
    logits exist at a time. A lone chunk is kept: backward needs all of its logits at once anyway,
    so recomputing it would cost a matmul and save no memory.
    """
    starts = range(0, hidden.shape[0], chunk_tokens)
    recompute = len(starts) > 1 and torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for i in starts:
        chunk = (head_weight, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens])
        if recompute:
            parts.append(checkpoint(_token_logps, *chunk, use_reentrant=False))
        else:
            parts.append(_token_logps(*chunk))
    return torch.cat(parts)


# no_grad, not inference_mode: FSDP allocates its all-gather buffers at the first forward and
# writes into them in every later one, which is impossible for tensors made in inference mode
# (a policy scored before its first training step, as the held-out pairs at the start are).
@torch.no_grad()
def score_pairs(
    model: Transformer,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    desc: str = "scoring",
    progress: bool = True,
) -> PairLogps:
    """Summed response log-probs of every pair, (N,) each (response_logps in batches), in eval
    mode without autograd.

    Pairs are scored in length order so that each batch pads to similar lengths; the result is in
    the order of `pairs`. `progress=False` hides the bar (every rank but one under torchrun).
    """
    from ropo.progress import progress_bar  # progress bars only where the long passes run

    was_training = model.training
    model.eval()
    device = model.output.weight.device
    order = sorted(range(len(pairs)), key=lambda i: _pair_length(pairs[i]))
    parts: list[tuple[list[int], PairLogps]] = []
    starts = range(0, len(order), batch_size)
    hide = not progress or len(starts) < 4
    for start in progress_bar(starts, desc=desc, unit="batch", leave=False, disable=hide):
        index = order[start : start + batch_size]
        batch = collate_pairs([pairs[i] for i in index], pad_id).to(device)
        parts.append((index, response_logps(model, batch)))
    model.train(was_training)
    return _reorder(parts, len(pairs))


def _pair_length(pair: TokenizedPair) -> int:
    # the length of the pair's row in a batch: [prompt | chosen | rejected]
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def _reorder(parts: list[tuple[list[int], PairLogps]], n: int) -> PairLogps:
    fields = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")
    out = {name: torch.zeros(n, dtype=torch.float32) for name in fields}
    for index, logps in parts:
        where = torch.tensor(index, dtype=torch.long)
        for name in fields:
            out[name][where] = getattr(logps, name).float().cpu()
    return PairLogps(**out)
