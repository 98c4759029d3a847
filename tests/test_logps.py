"""Response log-probs: shift and mask on the label side, sums in fp32, chunked head = full head."""

from __future__ import annotations

import torch

from ropo.data import TokenizedPair
from ropo.logps import collate_pairs, response_logps, score_pairs, sequence_logps
from ropo.models import ModelConfig, Transformer


def tiny_model(vocab: int = 50) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        sliding_window=None,
        tie_word_embeddings=False,
        architecture="LlamaForCausalLM",
        bos_token_id=1,
        eos_token_id=2,
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


def test_batch_layout_chosen_rows_first_with_label_side_mask() -> None:
    batch = collate_pairs(PAIRS, pad_id=0)
    assert batch.input_ids.shape == (4, 8)  # longest row 7 tokens, padded to a multiple of 8
    assert batch.input_ids[0, :7].tolist() == [1, 5, 6, 7, 8, 9, 2]
    assert batch.input_ids[2, :6].tolist() == [1, 5, 6, 7, 10, 2]
    # the response mask marks response tokens themselves, EOS included, prompt and pad excluded
    assert batch.response_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert batch.attention_mask[3].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


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


def test_chunked_head_gives_same_values_and_gradients() -> None:
    model = tiny_model()
    batch = collate_pairs(PAIRS, pad_id=0)
    results = []
    for chunk in (1, 3, 1024):
        model.zero_grad()
        sums, _ = sequence_logps(
            model, batch.input_ids, batch.attention_mask, batch.response_mask, chunk_tokens=chunk
        )
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
