"""The built-in task: sort a short list of small numbers, scored by a programmatic gold reward.

First stage of the built-in pipeline: seeded prompts and (partly wrong) demonstrations feed the
SFT stage, and `gold_reward` plays the human rater when pairs are built and policies evaluated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

PROMPT_WORD = "sort"


@dataclass(frozen=True)
class TaskData:
    """Three disjoint sets of prompts: SFT demonstrations, preference pairs, held-out evaluation."""

    sft_prompts: list[str]
    demonstrations: list[str]  # aligned with sft_prompts; some deliberately wrong
    demo_errors: int  # how many demonstrations are wrong
    train_prompts: list[str]  # prompts of the preference pairs
    heldout_prompts: list[str]


def make_prompt(numbers: Sequence[int]) -> str:
    """ "sort 5 2 8 1": the instruction word, then the numbers separated by spaces."""
    return " ".join([PROMPT_WORD, *map(str, numbers)])


def prompt_numbers(prompt: str) -> list[int]:
    words = prompt.split()
    if not words or words[0] != PROMPT_WORD:
        raise ValueError(f"not a sorting prompt: {prompt!r}")
    return [int(w) for w in words[1:]]


def correct_response(prompt: str) -> str:
    return " ".join(map(str, sorted(prompt_numbers(prompt))))


def gold_reward(prompt: str, response: str) -> float:
    """Share of positions where the response holds the right number, in [0, 1].

    Dividing by the longer of (target, response) penalises missing and extra numbers alike; a
    word that is not a number never matches. 1.0 only for the exact sorted list.
    """
    target = sorted(prompt_numbers(prompt))
    words = response.split()
    matches = sum(word == str(t) for word, t in zip(words, target, strict=False))
    return matches / max(len(target), len(words))


def make_task(
    n_sft: int,
    n_train: int,
    n_heldout: int,
    seed: int,
    min_len: int = 3,
    max_len: int = 7,
    max_value: int = 9,
    demo_error_rate: float = 0.3,
) -> TaskData:
    """Seeded prompts; no list appears twice, so the three sets share no prompt. The SFT set and
    its demonstrations depend only on (n_sft, seed, lengths, values, error rate).

    The SFT set is separate from the preference prompts (our choice), so the SFT model has not
    memorised the answers it is later asked to improve.
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len} max_len={max_len}")
    if not 0.0 <= demo_error_rate <= 1.0:
        raise ValueError(f"demo_error_rate={demo_error_rate} must be in [0, 1]")
    possible = sum((max_value + 1) ** n for n in range(min_len, max_len + 1))
    total = n_sft + n_train + n_heldout
    if total > possible // 2:
        raise ValueError(
            f"{total} prompts asked, but only {possible} lists exist "
            f"for lengths {min_len}-{max_len} and values 0-{max_value}"
        )
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    lists: list[list[int]] = []
    while len(lists) < total:
        numbers = [rng.randint(0, max_value) for _ in range(rng.randint(min_len, max_len))]
        if tuple(numbers) not in seen:
            seen.add(tuple(numbers))
            lists.append(numbers)
    prompts = [make_prompt(numbers) for numbers in lists]
    # A stream of its own, so the demonstrations (hence the SFT model) do not change with n_train.
    demo_rng = random.Random(seed + 1_000_003)
    demos, errors = [], 0
    for numbers in lists[:n_sft]:
        wrong = demo_rng.random() < demo_error_rate
        demos.append(demonstration(numbers, demo_rng, wrong, max_value))
        errors += wrong
    return TaskData(
        prompts[:n_sft], demos, errors, prompts[n_sft : n_sft + n_train], prompts[n_sft + n_train :]
    )


def demonstration(numbers: Sequence[int], rng: random.Random, wrong: bool, max_value: int) -> str:
    """The sorted list, or (wrong=True) the sorted list with one typical mistake.

    Mistakes are the ones a half-trained sorter makes: two neighbours swapped, one number replaced,
    dropped or repeated. They keep the SFT model only partly right, so its samples vary in quality.
    """
    answer = sorted(numbers)
    if wrong:
        i = rng.randrange(len(answer))
        j = i + 1 if i + 1 < len(answer) else i - 1  # a neighbour (-1 for a one-number list)
        kind = rng.choice(("swap", "replace", "drop", "repeat"))
        if kind == "swap" and j >= 0 and answer[i] != answer[j]:
            answer[i], answer[j] = answer[j], answer[i]
        elif kind == "drop" and len(answer) > 1:
            del answer[i]
        elif kind == "repeat":
            answer.insert(i, answer[i])
        else:  # replace (also the fallback when a swap or drop would change nothing)
            answer[i] = rng.choice([v for v in range(max_value + 1) if v != answer[i]])
    return " ".join(map(str, answer))
