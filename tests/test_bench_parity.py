"""The comparisons behind `make bench`'s correctness guard accept agreement and catch a mismatch.

bench/parity.py is loaded from its file: bench/ is a directory of scripts, not a package. No
timing is asserted anywhere in the test suite.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from model_fixtures import hf_model, save_hf
from ropo.models.load import load_model

PARITY_FILE = Path(__file__).resolve().parents[1] / "bench" / "parity.py"


@pytest.fixture(scope="module")
def parity() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_parity", PARITY_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_compare_accepts_rounding_and_flags_a_real_difference(parity: ModuleType) -> None:
    theirs = torch.tensor([-530.0, -512.25], dtype=torch.float64)
    # 530 * 1e-5 = 5.3e-3: a difference of 1e-3 is rounding, 1e-1 is a bug
    assert parity.compare("logps", theirs + 1e-3, theirs, rtol=1e-5).ok
    bad = parity.compare("logps", theirs + torch.tensor([0.0, 0.1]), theirs, rtol=1e-5)
    assert not bad.ok
    assert bad.max_abs == pytest.approx(0.1, abs=1e-6)
    assert not parity.compare("loss", 0.6931, 0.6932, atol=1e-5).ok
    assert parity.compare("loss", 0.69315, 0.69315, atol=1e-5).ok


def test_compare_refuses_shape_mismatch_and_nan(parity: ModuleType) -> None:
    assert not parity.compare("x", torch.zeros(3), torch.zeros(4), atol=1.0).ok
    assert not parity.compare("x", torch.tensor([float("nan")]), torch.zeros(1), atol=1.0).ok


def test_weight_check_maps_names_and_measures_against_the_update(
    parity: ModuleType, tmp_path: Path
) -> None:
    hf = hf_model("llama", num_attention_heads=8, num_key_value_heads=2)
    ours = load_model(save_hf(hf, tmp_path))
    initial = {name: p.detach().clone() for name, p in ours.named_parameters()}
    with torch.no_grad():  # the same update on both sides, as two agreeing trainers would make
        for p in (*ours.parameters(), *hf.parameters()):
            p.add_(1e-3)
    assert parity.weight_check(ours, hf, initial).ok
    with torch.no_grad():  # one weight of one side off by a full update: a real disagreement
        ours.layers[1].feed_forward.w3.weight[0, 0] += 1e-2
    check = parity.weight_check(ours, hf, initial)
    assert not check.ok
    assert check.max_abs == pytest.approx(1e-2, rel=1e-3)


def test_weight_check_needs_an_update(parity: ModuleType, tmp_path: Path) -> None:
    hf = hf_model("llama")
    ours = load_model(save_hf(hf, tmp_path))
    initial = {name: p.detach().clone() for name, p in ours.named_parameters()}
    assert not parity.weight_check(ours, hf, initial).ok  # no step taken: nothing was compared
