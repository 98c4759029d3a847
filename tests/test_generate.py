"""Batched KV-cached generation: same tokens as recomputing everything, and as transformers.

Prompts of different lengths make every batch left-padded, so padding, explicit positions and
(for Mistral) the sliding window all meet the cache.
"""

import pytest
import torch

from model_fixtures import hf_model, our_model, save_hf, tiny_config
from ropo.models import Transformer
from ropo.models.kernels import PackedLinear
from ropo.models.load import load_model
from ropo.models.sample import KVCache, cached_last_logits, generate

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 70, 8, 31, 12, 6], [100, 4, 55, 23, 7, 90]]
MODELS = {
    "llama_gqa": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "mistral_window_4": ("mistral", {"num_key_value_heads": 2, "sliding_window": 4}),
}


@torch.no_grad()
def greedy_by_recomputing(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The slow reference: the whole unpadded sequence through the model for every token."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(model(torch.tensor([tokens]))[0, -1].argmax().item())
    return tokens[len(prompt) :]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_with_cache_equals_recomputing(name: str) -> None:
    kind, overrides = MODELS[name]
    model = our_model(kind, **overrides)
    got = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    assert got == [greedy_by_recomputing(model, p, 8) for p in PROMPTS]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unpadded_prompts_equal_recomputing(name: str) -> None:
    # Prompts of one length need no mask in their pass, unless Mistral's window is shorter.
    kind, overrides = MODELS[name]
    model = our_model(kind, **overrides)
    prompts = [PROMPTS[1][:6], PROMPTS[2][:6]]
    got = generate(model, prompts, max_new_tokens=6, temperature=0)
    assert got == [greedy_by_recomputing(model, p, 6) for p in prompts]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_equals_transformers_generate(name: str, tmp_path) -> None:
    kind, overrides = MODELS[name]
    # no eos in the oracle's config, so it runs the full length as we do with eos_id=None
    hf = hf_model(kind, eos_token_id=None, bos_token_id=None, pad_token_id=0, **overrides)
    ours = load_model(save_hf(hf, tmp_path))
    expected = []
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        expected.append(out[0, len(prompt) :].tolist())
    assert generate(ours, PROMPTS, max_new_tokens=8, temperature=0) == expected


def test_greedy_equals_transformers_where_decoding_runs_packed(tmp_path) -> None:
    # Width 128 and a 1024-token vocabulary put the MLP weights and the tied LM head past
    # PackedLinear's size threshold, so the prompt pass and every decode step reorder their sums.
    overrides = {"hidden_size": 128, "intermediate_size": 512, "vocab_size": 1024}
    hf = hf_model("llama", eos_token_id=None, bos_token_id=None, pad_token_id=0, **overrides)
    ours = load_model(save_hf(hf, tmp_path))
    packed_calls = []
    for module in ours.modules():
        if isinstance(module, PackedLinear):
            module.register_forward_hook(
                lambda m, *_: packed_calls.append("packed_weight" in m.__dict__)
            )
    prompts = [[5, 17, 3, 9], [9, 1, 44, 2], [100, 4, 55, 23], [7, 90, 8, 31]]  # 4 rows, no padding
    out = hf.generate(torch.tensor(prompts), max_new_tokens=10, do_sample=False)
    expected = out[:, 4:].tolist()
    assert generate(ours, prompts, max_new_tokens=10, temperature=0) == expected
    assert sum(packed_calls) >= 3 * 10  # w1, w3 and the LM head, in every pass
    assert not any("packed_weight" in m.__dict__ for m in ours.modules())  # gone afterwards


def test_eos_ends_a_row_and_is_kept() -> None:
    model = our_model("llama")
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    eos = free[1][3]  # row 1 emits this at step 3 (or earlier)
    got = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eos_id=eos)
    for row, full in zip(got, free, strict=True):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    assert got[1][-1] == eos and len(got[1]) <= 4


def test_stops_once_every_row_has_finished() -> None:
    model = our_model("llama")
    torch.nn.init.zeros_(model.output.weight)  # all logits tie, so argmax is token 0 everywhere
    calls = []
    model.output.register_forward_hook(lambda *args: calls.append(1))  # once per step
    got = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eos_id=0)
    assert got == [[0], [0], [0]] and len(calls) == 1  # the prefill, and no decode step


def test_seeded_sampling_is_reproducible() -> None:
    model = our_model("mistral", num_key_value_heads=2, sliding_window=4)

    def sample(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, 10, temperature=1.5, top_p=0.9, generator=generator)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_tiny_top_p_is_greedy() -> None:
    model = our_model("llama", num_key_value_heads=2)
    greedy = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    generator = torch.Generator().manual_seed(0)
    assert generate(model, PROMPTS, 6, top_p=1e-6, generator=generator) == greedy


def test_zero_new_tokens_and_bad_arguments() -> None:
    model = our_model("llama")
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], []]
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, PROMPTS, **({"max_new_tokens": 2} | bad))
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[1, 2], []], max_new_tokens=2)


def test_vocab_limit_never_samples_padded_embedding_rows() -> None:
    """A checkpoint's embedding may have more rows than the tokenizer has pieces."""
    torch.manual_seed(0)
    model = tiny_llama_for_limit()
    with torch.no_grad():
        model.output.weight[40:] += 50.0  # make the rows past the tokenizer the most likely
    generator = torch.Generator().manual_seed(0)
    rows = generate(
        model,
        [[1, 5, 6]] * 4,
        max_new_tokens=8,
        temperature=1.0,
        generator=generator,
        vocab_limit=40,
    )
    assert all(0 <= token < 40 for row in rows for token in row)
    unlimited = generate(model, [[1, 5, 6]], max_new_tokens=8, temperature=0)
    assert any(token >= 40 for token in unlimited[0])  # the test would catch a no-op


def tiny_llama_for_limit() -> Transformer:
    config = tiny_config(vocab_size=64, n_layers=1, n_kv_heads=4, max_position_embeddings=64)
    return Transformer(config)


def test_cache_is_written_in_place_and_refuses_to_overflow() -> None:
    # Preallocated at full length (as gpt-fast's cache): steps write into the same buffers.
    model = our_model("llama", num_key_value_heads=2)
    cache = KVCache(model.config, 1, 4, torch.float32, "cpu")
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    one = torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        prompt = torch.tensor([[5, 6, 7]])
        cached_last_logits(model, prompt, torch.arange(3)[None], one.expand(1, 3), cache)
        last = cached_last_logits(model, torch.tensor([[8]]), torch.tensor([[3]]), one, cache)
        recomputed = model(torch.tensor([[5, 6, 7, 8]]))[0, -1]
    assert cache.length == 4 and [t.data_ptr() for t in cache.k + cache.v] == buffers
    assert torch.allclose(last[0], recomputed, atol=1e-5)
    with pytest.raises(ValueError, match="4 slots, 5 are needed"):
        cached_last_logits(model, torch.tensor([[9]]), torch.tensor([[4]]), one, cache)
