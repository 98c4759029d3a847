"""Response log-probs: logps.pair_logps (the textbook: shift, mask, gather, sum) against an
unbatched computation, and logps_fused.py against pair_logps, values and gradients: a
shared-prompt row per pair = two rows of their own, chunked head = full head, and the hand-written
backward of the target log-probs = autograd's."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import tiny_config
from ropo.data import TokenizedPair
from ropo.logps import collate_sequences, pair_logps
from ropo.logps_fused import (
    TargetLogProbs,
    attention_bias,
    collate_pairs,
    query_dtype,
    response_logps,
    score_pairs,
    sequence_logps,
    shared_prompt_mask,
)
from ropo.models import Transformer


def tiny_model(vocab: int = 50, sliding_window: int | None = None) -> Transformer:
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=vocab,
        sliding_window=sliding_window,
        architecture="LlamaForCausalLM" if sliding_window is None else "MistralForCausalLM",
    )
    return Transformer(config)


PAIRS = [
    TokenizedPair("a", (1, 5, 6, 7), (8, 9, 2), (10, 2)),
    TokenizedPair("b", (1, 11), (12, 13, 14, 15, 2), (16, 17, 2)),
]


def naive_logp(model: Transformer, prompt: tuple[int, ...], response: tuple[int, ...]) -> float:
    """Unpadded, unbatched: sum over response tokens of log softmax(logits[t-1])[token t]."""
    ids = torch.tensor([list(prompt + response)])
    logps = model(ids)[0].float().log_softmax(-1)
    return sum(logps[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))


def test_textbook_pair_logps_equal_unbatched_computation() -> None:
    model = tiny_model(sliding_window=3).eval()
    with torch.no_grad():
        logps = pair_logps(model, PAIRS, pad_id=0)
    for i, pair in enumerate(PAIRS):
        want = naive_logp(model, pair.prompt_ids, pair.chosen_ids)
        assert abs(logps.chosen[i].item() - want) < 1e-4
        want = naive_logp(model, pair.prompt_ids, pair.rejected_ids)
        assert abs(logps.rejected[i].item() - want) < 1e-4
    assert logps.chosen_tokens.tolist() == [3.0, 5.0]
    assert logps.rejected_tokens.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_fused_response_logps_equal_the_textbook(sliding_window: int | None) -> None:
    # The one-row layout, the chunked head (chunks of 3 are recomputed in backward) and the
    # hand-written backward together give pair_logps's values and gradients.
    results = []
    for fused in (True, False):
        model = tiny_model(sliding_window=sliding_window)
        if fused:
            logps = response_logps(model, collate_pairs(PAIRS, pad_id=0), chunk_tokens=3)
        else:
            logps = pair_logps(model, PAIRS, pad_id=0)
        (logps.chosen.sum() - 2 * logps.rejected.sum()).backward()
        sums = torch.cat([logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens])
        results.append([sums.detach(), *(p.grad for p in model.parameters())])
    for fused, textbook in zip(*results, strict=True):
        assert torch.allclose(fused, textbook, atol=1e-5)


def test_fused_sequence_logps_equal_the_textbook() -> None:
    model = tiny_model()
    prompts = [p.prompt_ids for p in PAIRS] * 2
    responses = [p.chosen_ids for p in PAIRS] + [p.rejected_ids for p in PAIRS]
    rows = collate_sequences(prompts, responses, pad_id=0)
    sums, counts = sequence_logps(model, *rows, chunk_tokens=2)  # chunks recomputed in backward
    sums.sum().backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    textbook = pair_logps(model, PAIRS, pad_id=0)
    (textbook.chosen.sum() + textbook.rejected.sum()).backward()
    assert torch.allclose(sums, torch.cat([textbook.chosen, textbook.rejected]), atol=1e-5)
    assert counts.tolist() == [3.0, 5.0, 2.0, 3.0]
    for fused, p in zip(fused_grads, model.parameters(), strict=True):
        assert torch.allclose(fused, p.grad, atol=1e-5)


def test_sequence_layout_marks_response_tokens_on_the_label_side() -> None:
    prompts = [p.prompt_ids for p in PAIRS] * 2
    responses = [p.chosen_ids for p in PAIRS] + [p.rejected_ids for p in PAIRS]
    input_ids, attention_mask, response_mask = collate_sequences(prompts, responses, pad_id=0)
    assert input_ids.shape == (4, 8)  # longest row 7 tokens, padded to a multiple of 8
    assert input_ids[0, :7].tolist() == [1, 5, 6, 7, 8, 9, 2]
    assert input_ids[2, :6].tolist() == [1, 5, 6, 7, 10, 2]
    # the response mask marks response tokens themselves, EOS included, prompt and pad excluded
    assert response_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert attention_mask[3].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_pair_layout_shares_the_prompt() -> None:
    batch = collate_pairs(PAIRS, pad_id=0)
    # pair a: [1 5 6 7 | 8 9 2 | 10 2], 9 tokens; pair b: 10 tokens; padded to 16
    assert batch.input_ids.shape == (2, 16)
    assert batch.input_ids[0, :10].tolist() == [1, 5, 6, 7, 8, 9, 2, 10, 2, 0]
    assert batch.segments[0, :10].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, -1]
    # the rejected response's positions restart right after the prompt (4 tokens)
    assert batch.positions[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5]
    # chosen tokens 8 9 2 are predicted from slots 3 4 5; rejected 10 2 from slots 3 (the
    # prompt's end, not the chosen EOS) and 7; pair b starts at flat index 16
    M_a = 5
    assert batch.predictors[:M_a].tolist() == [3, 4, 5, 3, 7]
    assert batch.targets[:M_a].tolist() == [8, 9, 2, 10, 2]
    assert batch.predictors[M_a:].tolist() == [17, 18, 19, 20, 21, 17, 23, 24]
    assert batch.owners.tolist() == [0, 0, 0, 2, 2, 1, 1, 1, 1, 1, 3, 3, 3]
    assert batch.lengths.tolist() == [3.0, 5.0, 2.0, 3.0]


def test_shared_prompt_mask_hides_the_other_response() -> None:
    batch = collate_pairs(PAIRS, pad_id=0)
    mask = shared_prompt_mask(batch.segments, batch.positions, sliding_window=None)[0, 0]
    assert mask[7, :10].tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 0, 0]  # rejected: prompt + itself
    assert mask[6, :10].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]  # chosen: causal
    # a pad query (never read) reads the prompt and itself, so its softmax stays finite
    assert mask[12].tolist() == [1, 1, 1, 1] + [0] * 8 + [1, 0, 0, 0]
    windowed = shared_prompt_mask(batch.segments, batch.positions, sliding_window=2)[0, 0]
    # rejected token at position 5 (slot 8) reads positions 4 and 5 (slots 7, 8) only
    assert windowed[8, :10].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]


def test_pair_without_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="pair x"):
        collate_pairs([TokenizedPair("x", (), (3, 2), (4, 2))], pad_id=0)


def test_summed_logps_equal_unbatched_computation() -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        logps = response_logps(model, collate_pairs(PAIRS, pad_id=0))
    for i, pair in enumerate(PAIRS):
        assert (
            abs(logps.chosen[i].item() - naive_logp(model, pair.prompt_ids, pair.chosen_ids)) < 1e-4
        )
        assert (
            abs(logps.rejected[i].item() - naive_logp(model, pair.prompt_ids, pair.rejected_ids))
            < 1e-4
        )
    assert logps.chosen_tokens.tolist() == [3.0, 5.0]
    assert logps.rejected_tokens.tolist() == [2.0, 3.0]
    mean = logps.mean()
    assert torch.allclose(mean.chosen, logps.chosen / torch.tensor([3.0, 5.0]))


def test_sliding_window_holds_in_the_shared_layout() -> None:
    # Window 3 is shorter than every sequence: a wrong key in the rejected response's window
    # (chosen tokens, or a window counted in slots) would change its log-prob.
    model = tiny_model(sliding_window=3).eval()
    with torch.no_grad():
        logps = response_logps(model, collate_pairs(PAIRS, pad_id=0))
    for i, pair in enumerate(PAIRS):
        want = naive_logp(model, pair.prompt_ids, pair.rejected_ids)
        assert abs(logps.rejected[i].item() - want) < 1e-4
        want = naive_logp(model, pair.prompt_ids, pair.chosen_ids)
        assert abs(logps.chosen[i].item() - want) < 1e-4


def test_shared_prompt_gradients_equal_two_rows() -> None:
    model = tiny_model()
    shared = response_logps(model, collate_pairs(PAIRS, pad_id=0))
    (shared.chosen.sum() - 2 * shared.rejected.sum()).backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    prompts = [p.prompt_ids for p in PAIRS] * 2
    responses = [p.chosen_ids for p in PAIRS] + [p.rejected_ids for p in PAIRS]
    sums, _ = sequence_logps(model, *collate_sequences(prompts, responses, pad_id=0))
    (sums[:2].sum() - 2 * sums[2:].sum()).backward()
    assert torch.allclose(shared.chosen, sums[:2], atol=1e-5)
    assert torch.allclose(shared.rejected, sums[2:], atol=1e-5)
    for want, p in zip(want_grads, model.parameters(), strict=True):
        assert torch.allclose(p.grad, want, atol=1e-5)


def test_chunked_head_gives_same_values_and_gradients() -> None:
    model = tiny_model()
    batch = collate_pairs(PAIRS, pad_id=0)
    results = []
    for chunk in (1, 3, 1024):  # recomputed in backward for 1 and 3, kept for 1024
        model.zero_grad()
        logps = response_logps(model, batch, chunk_tokens=chunk)
        sums = torch.cat([logps.chosen, logps.rejected])
        sums.sum().backward()
        results.append(
            (
                sums.detach(),
                model.output.weight.grad.clone(),
                model.tok_embeddings.weight.grad.clone(),
            )
        )
    for sums, head_grad, emb_grad in results[1:]:
        assert torch.allclose(sums, results[0][0], atol=1e-5)
        assert torch.allclose(head_grad, results[0][1], atol=1e-5)
        assert torch.allclose(emb_grad, results[0][2], atol=1e-5)


def test_score_pairs_keeps_input_order_and_restores_train_mode() -> None:
    model = tiny_model().train()
    pairs = PAIRS * 3
    pairs = [
        TokenizedPair(f"{p.id}{i}", p.prompt_ids, p.chosen_ids, p.rejected_ids)
        for i, p in enumerate(pairs)
    ]
    scored = score_pairs(model, pairs, batch_size=2, pad_id=0)
    assert model.training
    with torch.no_grad():
        direct = response_logps(model.eval(), collate_pairs(pairs, pad_id=0))
    assert torch.allclose(scored.chosen, direct.chosen, atol=1e-5)
    assert torch.allclose(scored.rejected, direct.rejected, atol=1e-5)


def test_target_logprobs_match_autograd_of_log_softmax_and_gather() -> None:
    torch.manual_seed(0)
    logits = 4 * torch.randn(6, 11, dtype=torch.float64)
    targets = torch.tensor([0, 3, 3, 10, 5, 0])
    grad = torch.randn(6, dtype=torch.float64)
    ours_leaf, reference_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = TargetLogProbs.apply(ours_leaf, targets)
    reference = reference_leaf.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    ours.backward(grad)
    reference.backward(grad)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-12)
    assert torch.allclose(ours_leaf.grad, reference_leaf.grad, rtol=0, atol=1e-12)


def test_target_logprobs_refuse_a_second_backward() -> None:
    # The backward reuses its saved log-probs in place; a retained graph must fail loudly.
    logits = torch.randn(3, 5, requires_grad=True)
    out = TargetLogProbs.apply(logits, torch.tensor([1, 2, 3])).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_bias_is_what_sdpa_makes_of_the_bool_mask(autocast: bool) -> None:
    # response_logps hands every layer one additive mask instead of the bool mask, which SDPA
    # would convert in each layer: the same log-probs and gradients, to the bit, also under
    # bf16 autocast, where the bias must take the queries' dtype.
    model = tiny_model(sliding_window=4)
    batch = collate_pairs(PAIRS, pad_id=0)
    mask = shared_prompt_mask(batch.segments, batch.positions, sliding_window=4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        bias = attention_bias(mask, query_dtype(model, batch.input_ids.device))
        results = []
        for attn_mask in (bias, mask):
            model.zero_grad()
            hidden = model.hidden_states(batch.input_ids, batch.positions, attn_mask)
            hidden.float().square().sum().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results.append([hidden.detach(), *grads])
    assert bias.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
