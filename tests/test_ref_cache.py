"""The reference cache's fingerprint: a change in how log-probs are computed must miss the cache.

LOGP_CONVENTION names the layout and units of the cached numbers; a cache written under another
convention (e.g. the old two-row layout) must not be read back as if it were current. A reference
model other than the policy's starting point (reference=DIR) scores the pairs, is part of the
key, and must be the policy's network with the policy's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import WORDS
from model_fixtures import randomize_
from ropo import ref_cache, ref_cache_files
from ropo.cli import main
from ropo.config_load import load_config
from ropo.data import TokenizedPair, load_pairs, tokenize_pairs
from ropo.eval_config import load_eval_settings
from ropo.logps_fused import score_pairs
from ropo.models import Transformer, load_model, load_tokenizer, save_model
from ropo.models.config import read_model_config
from ropo.models.tokenizer import train_tokenizer
from ropo.ref_cache import RefLogps
from ropo.run_setup import Run, reference, start_run
from ropo.training_run import run_inputs

OLD_CONVENTION = "summed-response-logps-fp32-v1"  # the two-row layout, before the shared prompt


def tiny_pairs(model_dir: Path, pairs_file: Path) -> list[TokenizedPair]:
    pairs, _ = tokenize_pairs(load_pairs(pairs_file)[0], load_tokenizer(model_dir), 64)
    return pairs


def test_the_logp_convention_is_part_of_the_fingerprint(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = tiny_pairs(tiny_model_dir, tiny_pairs_file)

    def where() -> tuple[Path, str]:
        return ref_cache_files.cache_location(tiny_model_dir, pairs, tmp_path, torch.float32, "cpu")

    path, fingerprint = where()
    assert where() == (path, fingerprint)  # deterministic, so the difference below is the string
    monkeypatch.setattr(ref_cache_files, "LOGP_CONVENTION", OLD_CONVENTION)
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
    current = ref_cache_files.LOGP_CONVENTION
    assert current != OLD_CONVENTION
    with monkeypatch.context() as old:
        old.setattr(ref_cache_files, "LOGP_CONVENTION", OLD_CONVENTION)
        ref_cache.reference_logps(tiny_model_dir, pairs, tmp_path, 16, pad_id=0)
        ref_cache.reference_logps(tiny_model_dir, pairs, tmp_path, 16, pad_id=0)
    assert len(loads) == 1  # same convention: the second call read the cache
    ref_cache.reference_logps(tiny_model_dir, pairs, tmp_path, 16, pad_id=0)
    assert len(loads) == 2  # another convention: the old file was not trusted
    metas = sorted(p.read_text() for p in tmp_path.glob("ref-logps-*.json"))
    assert len(metas) == 2 and any(f'"{current}"' in m for m in metas)


# --- reference=DIR: a reference model other than the policy's starting point ------------------


def other_weights(model_dir: Path, path: Path, seed: int) -> Path:
    """A copy of `model_dir` with other random weights: the same network and tokenizer."""
    shutil.copytree(model_dir, path)
    save_model(randomize_(load_model(path), seed), path)
    return path


def reference_of(model_dir: Path, pairs_file: Path, out: Path, *extra: str) -> tuple[Run, RefLogps]:
    """The run start_run sets up, and the reference log-probs train() computes for its pairs."""
    out.mkdir()
    args = [f"model={model_dir}", f"data={pairs_file}", f"out={out}", "max_length=64",
            "device=cpu", *extra]  # fmt: skip
    cfg = load_config(None, args)
    run = start_run(cfg, run_inputs(cfg))
    return run, reference(run, run.data.tokens)


def test_a_reference_dir_scores_the_pairs_instead_of_the_policy(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    other = other_weights(tiny_model_dir, tmp_path / "other", seed=1)
    run, default = reference_of(tiny_model_dir, tiny_pairs_file, tmp_path / "default")
    assert run.reference_dir == tiny_model_dir
    run, theirs = reference_of(
        tiny_model_dir, tiny_pairs_file, tmp_path / "run", f"reference={other}"
    )
    assert run.reference_dir == other and run.model_dir == tiny_model_dir
    direct = score_pairs(load_model(other), run.data.tokens, 16, run.tokenizer.pad_id)
    assert torch.equal(theirs.logps.chosen, direct.chosen)
    assert torch.equal(theirs.logps.rejected, direct.rejected)
    assert not torch.allclose(theirs.logps.chosen, default.logps.chosen)
    assert theirs.fingerprint != default.fingerprint  # cached apart
    inputs = json.loads((tmp_path / "run" / "run.json").read_text())["inputs"]
    assert inputs["reference"]["path"] == str(other)
    assert "reference" not in json.loads((tmp_path / "default" / "run.json").read_text())["inputs"]


def test_the_cache_key_changes_with_the_reference_weights(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    other = other_weights(tiny_model_dir, tmp_path / "other", seed=1)
    pairs = tiny_pairs(tiny_model_dir, tiny_pairs_file)

    def where() -> tuple[Path, str]:
        return ref_cache_files.cache_location(other, pairs, tmp_path, torch.float32, "cpu")

    before = where()
    assert where() == before
    save_model(randomize_(load_model(other), seed=2), other)  # rewritten in place, same size
    assert where()[1] != before[1] and where()[0] != before[0]


def test_a_reference_of_another_network_or_tokenizer_is_refused(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wider = tmp_path / "wider"
    config = dataclasses.replace(read_model_config(tiny_model_dir), intermediate_size=96)
    save_model(Transformer(config), wider)
    retokenized = Path(shutil.copytree(tiny_model_dir, tmp_path / "retokenized"))
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 8
    with capsys.disabled():  # sentencepiece writes its log to the real stderr
        train_tokenizer([*texts, "Question: Answer:"], retokenized, vocab_size=300)
    args = [f"model={tiny_model_dir}", f"data={tiny_pairs_file}", "max_length=64", "device=cpu"]
    cases = {
        wider: f"{wider}/config.json is not the network of the policy ({tiny_model_dir}/"
        "config.json): intermediate_size = 96 there, 64 in the policy's",
        retokenized: f"{retokenized}/tokenizer.model differs from the policy's "
        f"{tiny_model_dir}/tokenizer.model",
        tmp_path / "missing": f"config key 'reference': model directory {tmp_path / 'missing'}",
        empty: f"config key 'reference': no config.json in {empty}",
    }
    for reference_dir, message in cases.items():
        out = tmp_path / f"run-{reference_dir.name}"
        assert main(["train", *args, f"reference={reference_dir}", f"out={out}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("ropo: error: ") and message in err[-1], err
        assert not (out / "run.json").exists()  # refused before anything was written


def test_eval_of_a_final_takes_the_runs_reference(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    config = {"model": "models/start", "reference": str(tiny_model_dir), "beta": 0.5}
    info = {"run_id": "r", "inputs": {}, "config": config}
    (run / "run.json").write_text(json.dumps(info))
    settings = load_eval_settings([f"model={run / 'final'}", "data=pairs.jsonl"])
    assert settings.reference == str(tiny_model_dir) and settings.beta == 0.5
