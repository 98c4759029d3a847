"""Verifiable instruction-following constraints and the gold reward built from them.

The judge of the constraint task: prompts.py draws prompts that carry 1-2 Constraints, and
pairs.py and evaluate.py score a model's responses with `gold_reward`. Pure functions of text.

Each kind of constraint has an instruction (what the prompt asks) and a `closeness` function:
a number in [0, 1] that is exactly 1.0 when the response obeys and smaller the further off it
is (7 words for "exactly 5" is closer than 20). A response without a single word obeys nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A word: letters or digits, with inner apostrophes and hyphens ("don't", "well-known" are one).
WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
# A sentence ends at a run of . ! ? followed by whitespace or the end of the text.
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")

# Weight of the graded closeness in the gold reward. Small, so that obeying one more constraint
# always outweighs being closer on the others; large enough that two responses obeying the same
# constraints still differ when one of them is nearer the target (the pair then has a winner).
TIE_BREAK_WEIGHT = 0.1


def words(text: str) -> list[str]:
    """The words of `text`, in order (see WORD)."""
    return WORD.findall(text)


def count_sentences(text: str) -> int:
    """Sentences of `text`: pieces between sentence ends that hold at least one word."""
    return sum(1 for piece in SENTENCE_END.split(text) if words(piece))


def _off_by(actual: int, target: int) -> float:
    """1 when actual == target, then 1/2, 1/3, ... for each unit off."""
    return 1.0 / (1 + abs(actual - target))


def _exact_words(text: str, n: int) -> float:
    return _off_by(len(words(text)), n)


def _max_words(text: str, n: int) -> float:
    count = len(words(text))
    return 1.0 if count <= n else n / count


def _lowercase(text: str, _: None) -> float:
    letters = [c for c in text if c.isalpha()]  # none in "42": nothing is upper case there
    return sum(not c.isupper() for c in letters) / len(letters) if letters else 1.0


def _include_word(text: str, word: str) -> float:
    return 1.0 if word.lower() in (w.lower() for w in words(text)) else 0.0


def _exclude_word(text: str, word: str) -> float:
    return 1.0 / (1 + sum(w.lower() == word.lower() for w in words(text)))


def _ends_with_question(text: str, _: None) -> float:
    return 1.0 if text.rstrip().endswith("?") else 0.0


def _n_sentences(text: str, n: int) -> float:
    return _off_by(count_sentences(text), n)


def _starts_with(text: str, word: str) -> float:
    return 1.0 if words(text)[0].lower() == word.lower() else 0.0


def _no_commas(text: str, _: None) -> float:
    return 1.0 / (1 + text.count(","))


@dataclass(frozen=True)
class ConstraintKind:
    """One family of constraints: its instruction and its closeness function."""

    instruction: Callable[[Any], str]  # value -> the sentence of the prompt that asks for it
    closeness: Callable[[str, Any], float]  # (response, value) -> [0, 1]
    value_type: type | None  # int (a count), str (a word) or None (no value)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("s" if n != 1 else "")


KINDS: dict[str, ConstraintKind] = {
    "exact_words": ConstraintKind(
        lambda n: f"Answer in exactly {_plural(n, 'word')}.", _exact_words, int
    ),
    "max_words": ConstraintKind(lambda n: f"Use at most {_plural(n, 'word')}.", _max_words, int),
    "lowercase": ConstraintKind(lambda _: "Write only in lowercase letters.", _lowercase, None),
    "include_word": ConstraintKind(lambda w: f"Include the word '{w}'.", _include_word, str),
    "exclude_word": ConstraintKind(lambda w: f"Do not use the word '{w}'.", _exclude_word, str),
    "ends_with_question": ConstraintKind(
        lambda _: "End your answer with a question.", _ends_with_question, None
    ),
    "n_sentences": ConstraintKind(
        lambda n: f"Answer in exactly {_plural(n, 'sentence')}.", _n_sentences, int
    ),
    "starts_with": ConstraintKind(
        lambda w: f"Start your answer with the word '{w}'.", _starts_with, str
    ),
    "no_commas": ConstraintKind(lambda _: "Do not use any commas.", _no_commas, None),
}


@dataclass(frozen=True)
class Constraint:
    kind: str  # a key of KINDS
    value: int | str | None = None  # the count or the word; None for kinds without one

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        expected = KINDS[self.kind].value_type
        wanted = {None: "no value", int: "a count >= 1", str: "a word"}[expected]
        if expected is None:
            ok = self.value is None
        elif expected is int:
            ok = type(self.value) is int and self.value >= 1
        else:
            ok = isinstance(self.value, str) and words(self.value) == [self.value]
        if not ok:
            raise ValueError(f"constraint {self.kind!r} takes {wanted}, got {self.value!r}")

    def instruction(self) -> str:
        """The sentence of the prompt that asks for this constraint."""
        return KINDS[self.kind].instruction(self.value)


def closeness(constraint: Constraint, response: str) -> float:
    """How near `response` comes to obeying `constraint`, in [0, 1]; 1.0 exactly when it does.
    A response without words gets 0 for every constraint."""
    if not words(response):
        return 0.0
    return KINDS[constraint.kind].closeness(response, constraint.value)


def satisfied(constraint: Constraint, response: str) -> bool:
    """True when `response` obeys `constraint`."""
    return closeness(constraint, response) == 1.0


def gold_reward(constraints: tuple[Constraint, ...], response: str) -> float:
    """The gold reward of `response` to a prompt asking `constraints`, in [0, 1]:

        (1 - w) * (share of constraints obeyed) + w * (mean closeness),  w = TIE_BREAK_WEIGHT.

    It is 1 exactly when every constraint is obeyed and 0 for a response without words.
    """
    if not constraints:
        raise ValueError("gold_reward needs at least one constraint")
    scores = [closeness(c, response) for c in constraints]
    obeyed = sum(score == 1.0 for score in scores) / len(scores)
    return (1 - TIE_BREAK_WEIGHT) * obeyed + TIE_BREAK_WEIGHT * sum(scores) / len(scores)
