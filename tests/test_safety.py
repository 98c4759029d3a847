"""What a run trusts and leaves behind: no pickle or eval, confined writes, self-describing output.

Weights come only from safetensors and configs only through `yaml.safe_load`, so a downloaded
checkpoint or a shared YAML file cannot run code; a grep over src/ keeps it that way. A real run
(a subprocess with its own HOME, TMPDIR and working directory) must write only under `out` and
`cache_dir`, and its run.json and every checkpoint's state.json must say how it was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_synthetic_pairs
from ropo.checkpoint import verify_checkpoint
from ropo.config import KEYS
from ropo.config_load import load_config
from ropo.data import load_pairs, tokenize_pairs
from ropo.fingerprints import fingerprint_pairs
from ropo.models import load_model, load_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "ropo"
UNSAFE = {  # pattern -> why it is not allowed in src/
    r"\btorch\.(jit\.)?load\(": "torch.load unpickles: read weights with safetensors",
    r"\b(c?pickle|dill|marshal|shelve|joblib)\b": "unpickling runs code from the file",
    r"\byaml\.(load|load_all|full_load|unsafe_load)\(": "YAML is read with yaml.safe_load only",
    r"(?<![\w.])(eval|exec)\(": "config and data are data, never code",
    r"__import__\(|import_module\(": "classes are imported directly, not named by strings",
    r"shell\s*=\s*True": "no shell: arguments go to subprocess as a list",
    r"weights_only\s*=\s*False|allow_pickle": "unpickling runs code from the file",
}


def test_source_has_no_unsafe_loading() -> None:
    found = []
    for path in sorted(SRC.parent.rglob("*.py")):  # the library and the tasks beside it
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            found += [f"{path}:{lineno}: {why}" for pattern, why in UNSAFE.items()
                      if re.search(pattern, line.split("#")[0])]  # fmt: skip
    assert not found, "\n".join(found)
    assert "yaml.safe_load(" in (SRC / "config_load.py").read_text()


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One finished run with every place it might write under one root; what changed there."""
    root = tmp_path_factory.mktemp("confined")
    model_dir = Path(shutil.copytree(tiny_model_dir, root / "inputs" / "model"))
    data = write_synthetic_pairs(root / "inputs" / "pairs.jsonl", 8)
    for name in ("cwd", "home", "tmp"):
        (root / name).mkdir()
    args = [f"model={model_dir}", f"data={data}", f"out={root / 'out'}", "device=cpu",
            f"cache_dir={root / 'cache'}", "rounds=2", "rho=0.25", "batch_size=4",
            "max_length=64", "save_every=2", "seed=3"]  # fmt: skip
    before = snapshot(root)
    env = {**os.environ, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
           "XDG_CACHE_HOME": str(root / "home" / ".cache"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, "-m", "ropo", "train", *args]
    result = subprocess.run(command, cwd=root / "cwd", env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {"root": root, "args": args, "data": data, "model_dir": model_dir,
            "before": before, "after": snapshot(root)}  # fmt: skip


def test_run_writes_only_under_out_and_cache(run: dict) -> None:
    before, after = run["before"], run["after"]
    assert {name: after.get(name) for name in before} == before  # inputs untouched
    new = sorted(set(after) - set(before))
    assert new and all(name.startswith(("out/", "cache/")) for name in new), new
    assert any(name.startswith("cache/ref-logps-") for name in new)


def test_run_json_describes_the_run(run: dict) -> None:
    info = json.loads((run["root"] / "out" / "run.json").read_text())
    assert info["config"] == load_config(None, run["args"]).to_flat_dict()
    assert set(info["config"]) == set(KEYS)
    versions = info["versions"]
    assert versions["python"] == platform.python_version()
    assert all(versions[name] for name in ("ropo", "torch", "safetensors", "sentencepiece"))
    head = subprocess.run(["git", "-C", str(SRC), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()  # fmt: skip
    assert info["git_revision"] == (head or None)
    tokenizer = load_tokenizer(run["model_dir"])
    pairs, _ = tokenize_pairs(load_pairs(run["data"])[0], tokenizer, 64)
    assert info["data_fingerprint"] == fingerprint_pairs(pairs)
    assert info["data_report"] == f"{run['data']}: read 8 pairs, used 8, skipped 0"
    assert info["command"][1:] == ["train", *run["args"]]


def test_every_checkpoint_holds_the_resolved_config(run: dict) -> None:
    out = run["root"] / "out"
    config = json.loads((out / "run.json").read_text())["config"]
    checkpoints = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert [p.name for p in checkpoints] == ["round-2", "step-0000004"]  # the last two kept
    for path in checkpoints:
        verify_checkpoint(path)
        state = json.loads((path / "state.json").read_text())
        assert state["config"] == config, path.name
        assert {"round_idx", "global_step", "kept_ids", "n_skipped_nonfinite"} <= set(state["loop"])
    assert load_model(out / "final").config.vocab_size == 300
