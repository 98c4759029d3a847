"""Stage 3 of the built-in pipeline: SFT samples, ranked by the gold reward, become pairs.

In: the SFT model and the task prompts. Out: plain preference JSONL (`ropo.data` format), built as
UltraFeedback's rater does: the best of K samples is chosen, a worse one rejected, ties skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ropo.data import PreferencePair
from ropo.models import Tokenizer, Transformer, generate
from ropo.progress import progress_bar
from ropo_builtin.sorting import gold_reward


@dataclass(frozen=True)
class PairStats:
    """What pair building did with one split's prompts."""

    prompts: int
    pairs: int
    skipped_ties: int  # all samples tied on gold reward (or fewer than two were non-empty)
    mean_chosen_reward: float
    mean_rejected_reward: float


def sample_responses(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    prompts_per_batch: int = 128,
    desc: str = "sampling",
) -> list[list[str]]:
    """K decoded responses per prompt (EOS stripped), in prompt order.

    The generator is seeded here, so two models sampled with the same seed share their random
    numbers; that lowers the variance of comparisons such as win rates.
    """
    model.eval()
    generator = torch.Generator(device=model.output.weight.device).manual_seed(seed)
    prompt_ids = [tokenizer.encode_prompt_response(p, "")[0] for p in prompts]
    responses: list[list[str]] = []
    for start in progress_bar(range(0, len(prompts), prompts_per_batch), desc=desc, unit="batch"):
        batch = [ids for ids in prompt_ids[start : start + prompts_per_batch] for _ in range(k)]
        new_ids = generate(
            model,
            batch,
            max_new_tokens,
            temperature=temperature,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            generator=generator,
        )
        texts = [tokenizer.decode(ids) for ids in new_ids]
        responses += [texts[i : i + k] for i in range(0, len(texts), k)]
    return responses


def build_pairs(
    prompts: list[str], responses: list[list[str]], split: str, seed: int
) -> tuple[list[PreferencePair], PairStats]:
    """One pair per prompt: chosen = a sample with the highest gold reward, rejected = a random
    sample with a strictly lower one (UltraFeedback-binarized's rule). Ids are "<split>-<index>".

    Empty samples (EOS at once) are left out: preference files cannot hold an empty response.
    """
    rng = random.Random(seed)
    pairs, chosen_rewards, rejected_rewards, ties = [], [], [], 0
    for index, (prompt, samples) in enumerate(zip(prompts, responses, strict=True)):
        samples = [s for s in samples if s.strip()]
        rewards = [gold_reward(prompt, s) for s in samples]
        best = max(rewards, default=0.0)
        worse = [i for i, r in enumerate(rewards) if r < best]
        if not worse:
            ties += 1
            continue
        chosen = samples[rewards.index(best)]
        rejected = rng.choice(worse)
        pairs.append(
            PreferencePair(
                f"{split}-{index:05d}", prompt, chosen, samples[rejected], f"builtin:{split}"
            )
        )
        chosen_rewards.append(best)
        rejected_rewards.append(rewards[rejected])
    stats = PairStats(
        len(prompts), len(pairs), ties, _mean(chosen_rewards), _mean(rejected_rewards)
    )
    return pairs, stats


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
