"""A tiny Llama-style sentencepiece tokenizer trained on varied synthetic text, for tests.

Imported by test modules (not a conftest): `tiny_tokenizer(tmp_dir)` trains in well under a second.
"""

import random
from pathlib import Path

from ropo.models.tokenizer import Tokenizer, train_tokenizer

WORDS = (
    "the quick brown fox jumps over a lazy dog while my friend reads the post and writes a short "
    "summary question answer Paris is the capital of France because however therefore hello world "
    "I think you should ask them what happened yesterday at work"
).split()
EXTRAS = [
    "café", "naïve", "résumé", "Über", "Straße", "東京", "北京市", "こんにちは", "😀", "🚀",
    "Привет", "مرحبا", "[INST]", "[/INST]", "<<SYS>>", "TL;DR:", "r/relationships", "2+2=4",
    "3.14159", "def f(x):", "(yes)", "don't", "e-mail", "$100", "#tag", "«quote»", "—",
]  # fmt: skip
VOCAB_SIZE = 500


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """`n` texts mixing English words, accents, CJK, emoji, digits, tabs and newlines."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [
            rng.choice(WORDS if rng.random() < 0.8 else EXTRAS) for _ in range(rng.randint(3, 14))
        ]
        text = " ".join(words)
        if i % 5 == 0:
            text += "\n" + " ".join(rng.choice(WORDS) for _ in range(5))
        if i % 11 == 0:
            text = "\t" + text + "  "
        texts.append(text)
    return texts


def tiny_tokenizer(out_dir: Path) -> Tokenizer:
    """Train the test tokenizer into `out_dir`/tokenizer.model."""
    return train_tokenizer(corpus(), out_dir, vocab_size=VOCAB_SIZE)
