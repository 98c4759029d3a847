"""Logits parity with transformers, plus the C1 pitfalls of notes/pitfalls.md.

Each case builds a tiny random Llama or Mistral, moves it across the safetensors boundary in one
direction or the other and compares logits; pitfall tests show parity would catch each bug.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model_fixtures import (
    CASES,
    hf_logits,
    hf_model,
    load_hf,
    max_diff,
    our_model,
    random_ids,
    save_hf,
)
from ropo.models.config import ModelConfig
from ropo.models.llama import Attention, RotaryEmbedding, Transformer, causal_mask
from ropo.models.load import load_model, save_model

TOL = 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_checkpoint_gives_hf_logits(case: str, tmp_path) -> None:
    kind, overrides = CASES[case]
    hf = hf_model(kind, **overrides)
    ours = load_model(save_hf(hf, tmp_path))
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(hf, ids)) <= TOL
    if hf.config.tie_word_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


@pytest.mark.parametrize("case", ["gqa", "mistral_window", "tied", "head_dim_32"])
def test_our_checkpoint_gives_our_logits_in_hf(case: str, tmp_path) -> None:
    kind, overrides = CASES[case]
    ours = our_model(kind, seed=1, **overrides)
    save_model(ours, tmp_path)
    hf = load_hf(tmp_path, kind)
    ids = random_ids(2, 20, seed=1)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(hf, ids)) <= TOL
    if ours.config.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight


@pytest.mark.parametrize("case", ["mha", "mistral_window"])
def test_right_padding_keeps_real_token_logits(case: str, tmp_path) -> None:
    kind, overrides = CASES[case]
    hf = hf_model(kind, **overrides)
    ours = load_model(save_hf(hf, tmp_path))
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # row 1 has 13 real tokens, then right padding
    real = mask.bool()
    with torch.no_grad():
        padded = ours(ids, attn_mask=causal_mask(real, ours.config.sliding_window))
        assert max_diff(padded[real], hf_logits(hf, ids, attention_mask=mask)[real]) <= TOL
        assert max_diff(padded[1, :13], ours(ids[1:, :13])[0]) <= TOL


@pytest.mark.parametrize("case", ["gqa", "mistral_window"])
def test_left_padding_with_positions_matches_unpadded(case: str) -> None:
    kind, overrides = CASES[case]
    ours = our_model(kind, **overrides)
    ids = random_ids(1, 12)
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], dim=1)  # 6 pads on the left
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 12)], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        attn_mask = causal_mask(mask.bool(), ours.config.sliding_window)
        left = ours(padded, positions=positions, attn_mask=attn_mask)[:, 6:]
        assert max_diff(left, ours(ids)) <= TOL


def test_is_causal_fast_path_equals_explicit_mask() -> None:
    ours = our_model("mistral", num_attention_heads=8, num_key_value_heads=2, sliding_window=32)
    ids = random_ids(2, 16)
    with torch.no_grad():
        explicit = causal_mask(torch.ones_like(ids, dtype=torch.bool), ours.config.sliding_window)
        assert max_diff(ours(ids), ours(ids, attn_mask=explicit)) <= 1e-5


def test_gqa_query_head_reads_kv_head_h_div_n_rep() -> None:
    # Pitfall 3: with .repeat tiling, query head h would read kv head h % K instead of h // n_rep.
    config = our_model("llama", num_attention_heads=8, num_key_value_heads=2).config
    attention = Attention(config)
    torch.manual_seed(0)
    x = torch.randn(1, 6, config.dim)
    rope = RotaryEmbedding(config.head_dim, config.rope_theta)(torch.arange(6)[None], x.dtype)
    with torch.no_grad():
        got = attention(x, rope, None)
        expected = naive_attention(attention, x, rope, kv_head=lambda h: h // 4)
        tiled = naive_attention(attention, x, rope, kv_head=lambda h: h % 2)
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(got, tiled) > 1e-2  # the kv heads differ, so the mapping matters


def naive_attention(attn: Attention, x: torch.Tensor, rope, kv_head) -> torch.Tensor:
    """One query head at a time, written out, with an explicit head -> kv head mapping."""
    T, D = x.shape[1], attn.head_dim
    q = rope.rotate(attn.wq(x).view(1, T, -1, D))[0]  # (T, H, D)
    k = rope.rotate(attn.wk(x).view(1, T, -1, D))[0]  # (T, K, D)
    v = attn.wv(x).view(T, -1, D)  # (T, K, D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(attn.n_heads):
        scores = q[:, h] @ k[:, kv_head(h)].T / math.sqrt(D)  # (T, T)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        heads.append(weights @ v[:, kv_head(h)])  # (T, D)
    return attn.wo(torch.cat(heads, dim=-1))[None]  # (1, T, C)


def test_gate_up_swap_is_caught(tmp_path) -> None:
    # Pitfall 9: gate_proj -> w1 and up_proj -> w3; swapping them still gives plausible logits.
    hf = hf_model("llama")
    ours = load_model(save_hf(hf, tmp_path))
    ids = random_ids(1, 16)
    with torch.no_grad():
        reference = hf_logits(hf, ids)
        for layer in ours.layers:
            ff = layer.feed_forward
            ff.w1.weight, ff.w3.weight = ff.w3.weight, ff.w1.weight
        assert max_diff(ours(ids), reference) > 1e-2


@pytest.mark.parametrize(
    ("hf_field", "hf_value", "our_field", "wrong_value"),
    [("rms_norm_eps", 1e-2, "norm_eps", 1e-6), ("rope_theta", 1e6, "rope_theta", 1e4)],
)
def test_norm_eps_and_rope_theta_come_from_config(
    hf_field: str, hf_value: float, our_field: str, wrong_value: float, tmp_path
) -> None:
    # Pitfalls 5 and 6: both are read from config.json, and a wrong value shows in the logits.
    hf = hf_model("llama", **{hf_field: hf_value})
    ours = load_model(save_hf(hf, tmp_path))
    assert getattr(ours.config, our_field) == hf_value
    wrong = Transformer(dataclasses.replace(ours.config, **{our_field: wrong_value}))
    wrong.load_state_dict(ours.state_dict())
    ids = random_ids(1, 24)
    with torch.no_grad():
        reference = hf_logits(hf, ids)
        assert max_diff(ours(ids), reference) <= TOL
        assert max_diff(wrong.eval()(ids), reference) > 1e-3


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    ids = random_ids(2, 12)
    grads = []
    for flag in (False, True):
        model = our_model("mistral", num_key_value_heads=2, sliding_window=5).train()
        model.activation_checkpointing = flag
        real = torch.ones_like(ids, dtype=torch.bool)
        logits = model(ids, attn_mask=causal_mask(real, model.config.sliding_window))
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_bf16_error_is_no_worse_than_transformers_bf16(tmp_path) -> None:
    # Norm and softmax statistics stay in fp32, so our bf16 drift is HF's bf16 drift, not more.
    hf = hf_model("mistral", num_attention_heads=8, num_key_value_heads=2, sliding_window=5)
    ours = load_model(save_hf(hf, tmp_path), dtype=torch.bfloat16)
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    real = mask.bool()
    with torch.no_grad():
        reference = hf_logits(hf, ids, attention_mask=mask)[real]
        hf_bf16 = hf_logits(hf.to(torch.bfloat16), ids, attention_mask=mask)[real]
        logits = ours(ids, attn_mask=causal_mask(real, ours.config.sliding_window))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert max_diff(logits[real], reference) <= 2 * max_diff(hf_bf16, reference)


def test_num_params_counts_each_parameter_once() -> None:
    for tied in (False, True):
        model = our_model("llama", tie_word_embeddings=tied, num_key_value_heads=2)
        assert model.config.num_params() == sum(p.numel() for p in model.parameters())


def test_config_round_trips_through_hf_dict() -> None:
    for kind, overrides in CASES.values():
        config = our_model(kind, **overrides).config
        assert ModelConfig.from_hf(config.to_hf()) == config


def test_forward_keeps_nothing_between_calls() -> None:
    # forward(tokens) returns logits and stores nothing on any module (sample.py owns the cache).
    model = our_model("mistral", num_key_value_heads=2, sliding_window=5)

    def attributes() -> dict[tuple[str, str], object]:
        return {
            (name, key): dict(value) if isinstance(value, dict) else value
            for name, module in model.named_modules()
            for key, value in vars(module).items()
        }

    before = attributes()
    ids = random_ids(2, 12)
    with torch.no_grad():
        first = model(ids)
        second = model(ids)
    after = attributes()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, dict):
            assert value.keys() == after[key].keys(), key
            assert all(value[k] is after[key][k] for k in value), key
        else:
            assert after[key] is value, key
    assert torch.equal(first, second)
