"""`make bench`'s decoding check: our greedy tokens equal transformers' generate, and a model that
decodes differently is caught.

bench/decoding.py is loaded from its file, as test_bench_parity.py loads parity.py. Tiny shape,
no timing asserted.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import GenerationConfig

from model_fixtures import hf_model, randomize_, save_hf
from ropo.models.load import load_model

DECODING_FILE = Path(__file__).resolve().parents[1] / "bench" / "decoding.py"


@pytest.fixture(scope="module")
def decoding() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_decoding", DECODING_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # GQA and tied embeddings, as at SmolLM2's shape; EOS in the checkpoint, as the bench's has
    hf = hf_model(
        "llama", num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
        eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return save_hf(hf, tmp_path_factory.mktemp("decoding"))


@pytest.fixture(scope="module")
def models(decoding: ModuleType, checkpoint: Path) -> tuple:
    return decoding.load_transformers(checkpoint), load_model(checkpoint)


def test_greedy_tokens_equal_transformers(decoding: ModuleType, models: tuple) -> None:
    hf, ours = models
    workload = decoding.DecodeWorkload(batch=3, prompt_tokens=5, new_tokens=12)
    prompts = decoding.make_prompts(workload, ours.config.vocab_size, bos_id=1)
    theirs = decoding.transformers_greedy(hf, prompts, workload.new_tokens)
    mine = decoding.ours_greedy(ours, prompts, workload.new_tokens)
    assert [len(row) for row in theirs] == [12, 12, 12]
    assert decoding.first_difference(mine, theirs) is None
    same, margins = decoding.transformers_margins(hf, prompts, workload.new_tokens)
    assert same == theirs and margins.shape == (3, 12) and bool((margins >= 0).all())


def test_the_checkpoints_eos_does_not_end_their_rows(
    decoding: ModuleType, checkpoint: Path, tmp_path: Path
) -> None:
    prompts = [[1, 5, 17, 3], [1, 9, 44, 70]]
    theirs = decoding.transformers_greedy(decoding.load_transformers(checkpoint), prompts, 8)
    changed = Path(shutil.copytree(checkpoint, tmp_path / "eos"))
    config = GenerationConfig.from_pretrained(changed)
    config.eos_token_id = theirs[0][2]  # a token that row 0 does emit
    config.save_pretrained(changed)
    again = decoding.load_transformers(changed)
    assert decoding.transformers_greedy(again, prompts, 8) == theirs


def test_a_model_that_decodes_differently_is_caught(decoding: ModuleType, models: tuple) -> None:
    hf, ours = models
    workload = decoding.DecodeWorkload(batch=3, prompt_tokens=5, new_tokens=6)
    prompts = decoding.make_prompts(workload, ours.config.vocab_size, bos_id=1)
    theirs = decoding.transformers_greedy(hf, prompts, workload.new_tokens)
    other = randomize_(copy.deepcopy(ours), seed=1)  # same shape, other weights
    difference = decoding.first_difference(decoding.ours_greedy(other, prompts, 6), theirs)
    assert difference is not None and difference.startswith("row ")


def test_first_difference_names_row_position_and_length(decoding: ModuleType) -> None:
    assert decoding.first_difference([[5, 6], [7, 8]], [[5, 6], [7, 8]]) is None
    assert decoding.first_difference([[5, 6], [7, 9]], [[5, 6], [7, 8]]) == (
        "row 1, new token 1: ours 9, transformers 8"
    )
    assert (
        decoding.first_difference([[5]], [[5, 6]]) == "row 0: 1 new tokens against transformers' 2"
    )
    assert decoding.first_difference([[5]], [[5], [6]]) == "1 rows against transformers' 2"
    margins = torch.tensor([[0.5, 0.25], [0.125, 3e-6]])
    assert decoding.first_difference([[5, 6], [7, 9]], [[5, 6], [7, 8]], margins) == (
        "row 1, new token 1: ours 9, transformers 8 (its lead: 3e-06)"
    )


def test_bytes_per_step_count_weights_once_and_the_live_cache(
    decoding: ModuleType, models: tuple
) -> None:
    _, ours = models  # tied: the embedding table is the LM head, read once per step
    c = ours.config
    workload = decoding.DecodeWorkload(batch=3, prompt_tokens=5, new_tokens=12)
    got = decoding.decode_bytes_per_step(ours, workload)
    params = sum(p.numel() for p in ours.parameters())
    assert got["weights"] == 4 * params
    # 3 rows x (5 + 12/2) keys x k and v x layers x kv heads x head size x 4 bytes
    assert got["kv_cache"] == 3 * 11 * 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4


def test_gpu_scripts_decoding_section_runs_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench/gpu_measure.py's `decode` section, on CPU at a tiny shape: checkpoint written, both
    # sides loaded in bf16, tokens compared, targets attached. (Its timings mean nothing here.)
    monkeypatch.syspath_prepend(str(DECODING_FILE.parent))
    gpu_measure = importlib.import_module("gpu_measure")
    tiny = {"vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}
    monkeypatch.setitem(gpu_measure.SHAPES, "tiny", tiny | {"head_dim": 8, "intermediate_size": 64})
    workload = gpu_measure.DecodeWorkload(batch=2, prompt_tokens=4, new_tokens=3)
    result = gpu_measure.decoding_vs_transformers("tiny", workload, device="cpu")
    assert result["workload"]["dtype"] == "torch.bfloat16"
    assert result["first_difference"] is None or result["first_difference"].startswith("row ")
    assert set(result["targets"]) == {"new_tokens_per_s", "share_of_bound"}
    assert result["sides"]["ours"]["runs_timed"] == 2
