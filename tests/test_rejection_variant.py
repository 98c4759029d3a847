"""Rejection sampling's pair rules (rs_pair_rule): which candidate pair each rule picks.

The default rule (reward: highest vs lowest implicit reward of the K samples) must stay as it
was; likelihood ranks by the policy's log-prob per token, and +original adds the dropped pair's
two responses to the candidates (filter/rejection.py, docs/method.md §4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ropo.filter.rejection as rejection
from conftest import read_jsonl, write_synthetic_pairs
from model_fixtures import count_packings, packable_model
from ropo.config import RS_PAIR_RULES, FilterSettings
from ropo.data import TokenizedPair
from ropo.models import Transformer, load_model, load_tokenizer

PROMPT = "Question: apple banana cherry Answer:"


def test_scores_worked_numbers() -> None:
    # Three candidates of 4 tokens each. Summed log-probs, policy and reference:
    #   a: -0.4 / -0.6   (the reference's favourite; the policy raised it by 0.2)
    #   b: -4.0 / -6.0   (rare under the reference; the policy raised it by 2.0)
    #   c: -8.0 / -7.0   (the policy lowered it by 1.0)
    policy = torch.tensor([-0.4, -4.0, -8.0])
    ref = torch.tensor([-0.6, -6.0, -7.0])
    n_tokens = torch.tensor([4.0, 4.0, 4.0])
    # reward, beta = 0.5: 0.5 * (0.2, 2.0, -1.0) = (0.1, 1.0, -0.5) -> chosen b, rejected c
    reward = rejection.candidate_scores("reward", policy, ref, n_tokens, beta=0.5)
    torch.testing.assert_close(reward, torch.tensor([0.1, 1.0, -0.5]))
    assert (reward.argmax().item(), reward.argmin().item()) == (1, 2)
    # likelihood: (-0.4, -4.0, -8.0) / 4 = (-0.1, -1.0, -2.0) -> chosen a, rejected c
    likelihood = rejection.candidate_scores("likelihood", policy, ref, n_tokens, beta=0.5)
    torch.testing.assert_close(likelihood, torch.tensor([-0.1, -1.0, -2.0]))
    assert (likelihood.argmax().item(), likelihood.argmin().item()) == (0, 2)


def test_likelihood_is_per_token_so_length_alone_does_not_decide() -> None:
    # Summed, the 2-token answer (-0.6) beats the 12-token one (-1.2); per token the long one
    # wins: -1.2 / 12 = -0.1 > -0.6 / 2 = -0.3.
    policy, n_tokens = torch.tensor([-1.2, -0.6]), torch.tensor([12.0, 2.0])
    scores = rejection.candidate_scores("likelihood", policy, policy, n_tokens, beta=1.0)
    torch.testing.assert_close(scores, torch.tensor([-0.1, -0.3]))


def test_every_configurable_rule_parses_and_others_are_refused() -> None:
    parsed = [rejection.parse_pair_rule(rule) for rule in RS_PAIR_RULES]
    assert parsed == [
        ("reward", False),
        ("reward", True),
        ("likelihood", False),
        ("likelihood", True),
    ]
    for bad in ("original", "likelihood+samples", "reward+original+original", "Reward"):
        with pytest.raises(ValueError, match="rs_pair_rule"):
            rejection.parse_pair_rule(bad)
    with pytest.raises(ValueError, match="'rs_pair_rule' = 'likelihood\\+samples'"):
        FilterSettings(rs_pair_rule="likelihood+samples")


def textbook_logp(model: Transformer, prompt: tuple[int, ...], response: list[int]) -> float:
    """Summed log-prob of `response` after `prompt`: one forward pass, log-softmax, gather."""
    tokens = torch.tensor([[*prompt, *response]])
    with torch.no_grad():
        logps = F.log_softmax(model(tokens)[0, :-1].float(), dim=-1)  # (T-1, V)
    picked = logps.gather(1, tokens[0, 1:, None])[:, 0]  # (T-1,)
    return picked[len(prompt) - 1 :].sum().item()


@pytest.fixture()
def dropped_pair(tiny_model_dir: Path) -> TokenizedPair:
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt, chosen = tokenizer.encode_prompt_response(PROMPT, " apple apple")
    _, rejected = tokenizer.encode_prompt_response(PROMPT, " zulu zulu")
    return TokenizedPair("p0", tuple(prompt), tuple(chosen), tuple(rejected))


def sample_with_rule(
    tiny_model_dir: Path,
    dropped: TokenizedPair,
    samples: list[list[int]],
    rule: str,
    reference: Transformer,
    monkeypatch: pytest.MonkeyPatch,
) -> rejection.SampledPairs:
    """rejection_sample on one dropped pair, the sampler replaced by one returning `samples`."""
    policy = load_model(tiny_model_dir)
    monkeypatch.setattr(rejection, "sample_responses", lambda model, prompts, *_: [*samples])
    settings = rejection.SamplingSettings(
        k=len(samples), beta=1.0, temperature=1.0, top_p=1.0, max_new_tokens=4, pair_rule=rule
    )
    tokenizer = load_tokenizer(tiny_model_dir)
    return rejection.rejection_sample(policy, reference, [dropped], 0, settings, tokenizer)


def test_original_responses_give_a_pair_when_every_sample_is_the_same(
    tiny_model_dir: Path, dropped_pair: TokenizedPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = [7, 8, 9, load_tokenizer(tiny_model_dir).eos_id]
    reference = load_model(tiny_model_dir)
    alone = sample_with_rule(
        tiny_model_dir, dropped_pair, [sample] * 3, "likelihood", reference, monkeypatch
    )
    assert alone.pairs == [] and alone.skipped == {"identical_samples": 1}

    result = sample_with_rule(
        tiny_model_dir, dropped_pair, [sample] * 3, "likelihood+original", reference, monkeypatch
    )
    candidates = [sample, list(dropped_pair.chosen_ids), list(dropped_pair.rejected_ids)]
    policy = load_model(tiny_model_dir)
    per_token = [textbook_logp(policy, dropped_pair.prompt_ids, c) / len(c) for c in candidates]
    best, worst = max(range(3), key=per_token.__getitem__), min(range(3), key=per_token.__getitem__)
    assert best != worst  # the random model does not tie: the test can tell the candidates apart
    (sampled,) = result.pairs
    pair = sampled.tokens
    assert pair.id == "p0@rs0" and pair.prompt_ids == dropped_pair.prompt_ids
    assert sampled.round == 1  # sampled after round 1 (round_idx 0), as the audit files count
    assert list(pair.chosen_ids) == candidates[best]
    assert list(pair.rejected_ids) == candidates[worst]
    expected = [
        textbook_logp(policy, dropped_pair.prompt_ids, candidates[i]) for i in (best, worst)
    ]
    torch.testing.assert_close(
        torch.stack([result.policy.chosen, result.policy.rejected]).flatten(),
        torch.tensor(expected),
        rtol=1e-4,
        atol=1e-4,
    )
    # The reference is the same random model, so its log-probs of the pair are the policy's.
    reference_logps = torch.tensor([sampled.ref_chosen_logp, sampled.ref_rejected_logp])
    torch.testing.assert_close(reference_logps, torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_reward_rule_picks_highest_and_lowest_implicit_reward(
    tiny_model_dir: Path, dropped_pair: TokenizedPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    eos = load_tokenizer(tiny_model_dir).eos_id
    samples = [[5, 6, eos], [40, 41, 42, eos], [90, eos], [120, 121, eos]]
    reference = load_model(tiny_model_dir)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference that differs from the policy: rewards are not all 0
        for weight in reference.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=noise))
    result = sample_with_rule(
        tiny_model_dir, dropped_pair, samples, "reward", reference, monkeypatch
    )
    policy = load_model(tiny_model_dir)
    prompt = dropped_pair.prompt_ids
    rewards = [
        textbook_logp(policy, prompt, s) - textbook_logp(reference, prompt, s) for s in samples
    ]
    (sampled,) = result.pairs
    pair = sampled.tokens
    assert list(pair.chosen_ids) == samples[max(range(4), key=rewards.__getitem__)]
    assert list(pair.rejected_ids) == samples[min(range(4), key=rewards.__getitem__)]


def test_train_with_likelihood_and_original_writes_sampled_pairs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "run"
    args = [
        f"model={tiny_model_dir}", f"data={data}", f"out={out}", "loss=ropo", "rounds=2",
        "rho=0.25", "batch_size=4", "lr=3e-3", "warmup_ratio=0", "max_length=64", "device=cpu",
        "rejection_sampling=true", "rs_k=2", "rs_max_new_tokens=4",
        "rs_pair_rule=likelihood+original",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "ropo", "train", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in read_jsonl(data)}
    dropped = [
        r["id"] for r in read_jsonl(out / "pairs.jsonl") if r["round"] == 1 and not r["kept"]
    ]
    sampled = read_jsonl(out / "sampled_pairs.jsonl")
    # The originals differ, so every distinct prompt of a dropped pair gets a pair.
    assert len(sampled) == len({records[i]["prompt"] for i in dropped}) == 4
    assert "skipped: {'identical_samples': 0}" in result.stdout
    originals = 0
    for record in sampled:
        source = records[record["id"].split("@rs")[0]]
        assert record["round"] == 1 and record["chosen_ids"] != record["rejected_ids"]
        responses = {source["chosen"].strip(), source["rejected"].strip()}
        originals += record["chosen"].strip() in responses
        originals += record["rejected"].strip() in responses
    # Four-token samples of a random model are never " word word": these came from the pairs.
    assert originals > 0


def test_an_unknown_rule_is_one_line_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 4)
    command = [
        sys.executable, "-m", "ropo", "train", f"model={tiny_model_dir}", f"data={data}",
        f"out={tmp_path / 'run'}", "rejection_sampling=true", "rs_pair_rule=loss",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ropo: error: ") and result.stderr.count("\n") == 1
    assert "'rs_pair_rule' = 'loss' is not one of reward, reward+original" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_round_packs_the_policy_once_and_scores_as_the_textbook_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = packable_model(tokenizer.vocab_size)
    reference = packable_model(tokenizer.vocab_size, seed=1)
    packings = count_packings(monkeypatch)
    dropped = []
    for i, word in enumerate(["apple", "fox", "golf", "hotel", "india"]):
        prompt, chosen = tokenizer.encode_prompt_response(f"Question: {word} Answer:", " a")
        _, rejected = tokenizer.encode_prompt_response(f"Question: {word} Answer:", " b")
        dropped.append(TokenizedPair(f"p{i}", tuple(prompt), tuple(chosen), tuple(rejected)))
    settings = rejection.SamplingSettings(k=2, beta=1.0, temperature=1.0, top_p=1.0,
                                          max_new_tokens=4, prompts_per_batch=2)  # fmt: skip
    found = rejection.rejection_sample(policy, reference, dropped, 0, settings, tokenizer)
    assert packings[0] == 2 * policy.config.n_layers and not any(packings[1:])  # once for 3 batches
    assert len(packings) == 1 + 3  # the round's block, then one per generate call
    assert not any(k.startswith("packed_") for m in policy.modules() for k in m.__dict__)
    # scored on the packed weights: the textbook forward's log-probs, to rounding
    assert found.pairs
    for pair, chosen_logp in zip(found.pairs, found.policy.chosen, strict=True):
        want = textbook_logp(policy, pair.tokens.prompt_ids, list(pair.tokens.chosen_ids))
        assert chosen_logp.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
