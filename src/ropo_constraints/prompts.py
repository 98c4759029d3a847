"""The prompts of the constraint task: a topic plus 1-2 verifiable constraints, drawn from a seed.

First stage of the pipeline (stages.py): `make_prompts` draws train and held-out prompts, which
are written as JSONL records that `ropo generate` reads as they are ("id", "prompt") and that
carry their constraints ("constraints") for the gold reward (constraints.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ropo.jsonl import read_records
from ropo_constraints.constraints import KINDS, Constraint

# (the question, words the answer may well use: include/exclude constraints pick from these)
TOPICS = (
    ("Describe the ocean.", ("water", "waves", "blue", "deep")),
    ("Give advice about sleep.", ("night", "bed", "rest", "hours")),
    ("Explain how plants grow.", ("sun", "water", "soil", "leaves")),
    ("Describe your favourite season.", ("summer", "winter", "warm", "cold")),
    ("Give advice about learning a new language.", ("words", "practice", "speak", "daily")),
    ("Describe a busy city street.", ("cars", "people", "noise", "shops")),
    ("Explain why exercise is healthy.", ("heart", "body", "strong", "energy")),
    ("Describe a cup of coffee.", ("hot", "bitter", "morning", "milk")),
    ("Give advice about saving money.", ("budget", "spend", "bank", "plan")),
    ("Describe a forest at night.", ("trees", "dark", "owls", "quiet")),
    ("Explain what a computer does.", ("data", "programs", "memory", "fast")),
    ("Describe the moon.", ("night", "light", "sky", "round")),
    ("Give advice about making friends.", ("listen", "kind", "time", "share")),
    ("Explain how rain forms.", ("clouds", "water", "cold", "drops")),
    ("Describe a good breakfast.", ("eggs", "bread", "fruit", "morning")),
    ("Give advice about public speaking.", ("practice", "audience", "calm", "voice")),
    ("Describe a mountain.", ("snow", "high", "rocks", "peak")),
    ("Explain why reading is useful.", ("books", "learn", "words", "mind")),
    ("Describe a cat.", ("fur", "soft", "paws", "sleep")),
    ("Give advice about staying focused.", ("phone", "work", "breaks", "goals")),
    ("Describe a thunderstorm.", ("rain", "lightning", "loud", "dark")),
    ("Explain how a bicycle works.", ("wheels", "pedals", "chain", "balance")),
    ("Describe a library.", ("books", "quiet", "shelves", "read")),
    ("Give advice about cooking at home.", ("food", "recipe", "fresh", "cheap")),
    ("Describe the desert.", ("sand", "hot", "dry", "sun")),
    ("Explain why we need bees.", ("flowers", "honey", "food", "plants")),
    ("Describe a birthday party.", ("cake", "friends", "gifts", "music")),
    ("Give advice about writing an email.", ("clear", "short", "subject", "polite")),
    ("Describe a train journey.", ("window", "travel", "seats", "station")),
    ("Explain what friendship means.", ("trust", "help", "time", "care")),
    ("Describe a garden in spring.", ("flowers", "green", "birds", "sun")),
    ("Give advice about drinking enough water.", ("bottle", "day", "thirst", "health")),
)
START_WORDS = ("yes", "honestly", "first", "imagine", "sometimes", "today")
LENGTH_KINDS = ("exact_words", "max_words")  # a prompt asks for at most one length


@dataclass(frozen=True)
class PromptSpec:
    """One prompt: the question and the constraints the answer is scored on."""

    id: str
    topic: str
    constraints: tuple[Constraint, ...]

    @property
    def text(self) -> str:
        """The user turn the model sees: the topic, then one instruction per constraint."""
        return " ".join([self.topic] + [c.instruction() for c in self.constraints])


def draw_constraint(kind: str, topic_words: tuple[str, ...], rng: random.Random) -> Constraint:
    """A constraint of `kind` with a value drawn from `rng` (topic words for include/exclude)."""
    values = {
        "exact_words": lambda: rng.randint(5, 15),
        "max_words": lambda: rng.choice((10, 15, 20, 25)),
        "include_word": lambda: rng.choice(topic_words),
        "exclude_word": lambda: rng.choice(topic_words),
        "n_sentences": lambda: rng.randint(1, 3),
        "starts_with": lambda: rng.choice(START_WORDS),
    }
    return Constraint(kind, values[kind]() if kind in values else None)


def compatible(constraints: tuple[Constraint, ...]) -> bool:
    """False for sets an answer could not obey, or that ask one thing twice: two lengths, a word
    both required and banned, two constraints of one kind."""
    kinds = [c.kind for c in constraints]
    if len(set(kinds)) != len(kinds) or sum(k in LENGTH_KINDS for k in kinds) > 1:
        return False
    word_kinds = ("include_word", "exclude_word", "starts_with")
    chosen_words = [c.value for c in constraints if c.kind in word_kinds]
    return len(set(chosen_words)) == len(chosen_words)


def draw_prompt(prompt_id: str, rng: random.Random) -> PromptSpec:
    """A topic and one or two compatible constraints, both drawn from `rng`."""
    topic, topic_words = rng.choice(TOPICS)
    while True:
        kinds = rng.sample(sorted(KINDS), rng.choice((1, 2)))
        constraints = tuple(draw_constraint(kind, topic_words, rng) for kind in kinds)
        if compatible(constraints):
            return PromptSpec(prompt_id, topic, constraints)


def make_prompts(n_train: int, n_heldout: int, seed: int) -> tuple[list[PromptSpec], ...]:
    """(train, held-out) prompts from `seed`; no prompt text appears twice, so none is in both.

    Ids are "train-00000", "heldout-00000", ... Each split draws from its own random stream,
    so the train prompts do not change with the number of held-out prompts.
    """
    seen: set[str] = set()
    splits = []
    for split, n, stream in (("train", n_train, 0), ("heldout", n_heldout, 1)):
        rng, prompts = random.Random(f"{seed}-{stream}"), []
        for _ in range(100 * n):  # the task has tens of thousands of distinct prompts
            if len(prompts) == n:
                break
            spec = draw_prompt(f"{split}-{len(prompts):05d}", rng)
            if spec.text not in seen:
                seen.add(spec.text)
                prompts.append(spec)
        if len(prompts) < n:
            raise ValueError(
                f"asked for {n} {split} prompts, found only {len(prompts)} distinct ones"
            )
        splits.append(prompts)
    return tuple(splits)


def prompt_record(spec: PromptSpec) -> dict:
    """The JSON record of `spec`: "id" and "prompt" for `ropo generate`, "constraints" for us."""
    constraints = [{"kind": c.kind, "value": c.value} for c in spec.constraints]
    return {"id": spec.id, "prompt": spec.text, "topic": spec.topic, "constraints": constraints}


def write_prompts(specs: list[PromptSpec], path: Path) -> None:
    """One prompt_record per line."""
    lines = [json.dumps(prompt_record(spec), ensure_ascii=False) + "\n" for spec in specs]
    path.write_text("".join(lines), encoding="utf-8")


def read_prompts(path: Path) -> list[PromptSpec]:
    """The prompts of a file written by write_prompts; ValueError("file:line: ...") for a record
    that is malformed or whose prompt text is not the one its constraints give."""
    specs = []
    for where, record in read_records(path):
        try:
            constraints = tuple(
                Constraint(item["kind"], item.get("value")) for item in record["constraints"]
            )
            spec = PromptSpec(record["id"], record["topic"], constraints)
        except KeyError as err:
            raise ValueError(f"{where}: missing field {err} of a constraint-task prompt") from None
        except TypeError:
            raise ValueError(
                f'{where}: field \'constraints\' must be a list of {{"kind": ..., "value": ...}}'
            ) from None
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if record.get("prompt") != spec.text:
            raise ValueError(
                f"{where}: field 'prompt' does not match its topic and constraints; expected "
                f"{spec.text!r}"
            )
        specs.append(spec)
    return specs
