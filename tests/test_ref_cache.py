"""The reference cache's fingerprint: a change in how log-probs are computed must miss the cache.

LOGP_CONVENTION names the layout and units of the cached numbers; a cache written under another
convention (e.g. the old two-row layout) must not be read back as if it were current.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ropo import ref_cache
from ropo.data import TokenizedPair, load_pairs, tokenize_pairs
from ropo.models import load_tokenizer

OLD_CONVENTION = "summed-response-logps-fp32-v1"  # the two-row layout, before the shared prompt


def tiny_pairs(model_dir: Path, pairs_file: Path) -> list[TokenizedPair]:
    pairs, _ = tokenize_pairs(load_pairs(pairs_file)[0], load_tokenizer(model_dir), 64)
    return pairs


def test_the_logp_convention_is_part_of_the_fingerprint(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = tiny_pairs(tiny_model_dir, tiny_pairs_file)

    def where() -> tuple[Path, str]:
        return ref_cache.cache_location(tiny_model_dir, pairs, tmp_path, torch.float32, "cpu")

    path, fingerprint = where()
    assert where() == (path, fingerprint)  # deterministic, so the difference below is the string
    monkeypatch.setattr(ref_cache, "LOGP_CONVENTION", OLD_CONVENTION)
    old_path, old_fingerprint = where()
    assert old_fingerprint != fingerprint and old_path != path


def test_a_cache_from_another_convention_is_recomputed(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written under the old convention, then asked for under the current one: scored again."""
    pairs = tiny_pairs(tiny_model_dir, tiny_pairs_file)
    loads = []
    real_load = ref_cache.load_model

    def counting_load(*args: object, **kwargs: object) -> torch.nn.Module:
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ref_cache, "load_model", counting_load)
    current = ref_cache.LOGP_CONVENTION
    assert current != OLD_CONVENTION
    with monkeypatch.context() as old:
        old.setattr(ref_cache, "LOGP_CONVENTION", OLD_CONVENTION)
        ref_cache.reference_logps(tiny_model_dir, pairs, tmp_path, 16, pad_id=0)
        ref_cache.reference_logps(tiny_model_dir, pairs, tmp_path, 16, pad_id=0)
    assert len(loads) == 1  # same convention: the second call read the cache
    ref_cache.reference_logps(tiny_model_dir, pairs, tmp_path, 16, pad_id=0)
    assert len(loads) == 2  # another convention: the old file was not trusted
    metas = sorted(p.read_text() for p in tmp_path.glob("ref-logps-*.json"))
    assert len(metas) == 2 and any(f'"{current}"' in m for m in metas)
