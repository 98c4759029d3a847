"""One run per directory, and errors about the directory itself as one line, through the CLI.

Each case runs `python -m ropo train` as a user would and checks the exit code, that there is no
traceback, the message, and that nothing already in the run directory was lost or changed. The
kill, signal, lock and resume cases are in tests/test_faults.py. Read-only and full file systems
are made in a private mount namespace (`unshare`), so the tests work as root too, for whom
permission bits do not stop a write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import write_synthetic_pairs
from model_fixtures import randomize_
from ropo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ropo.config_load import load_config
from ropo.models import load_model, save_model
from ropo.train import train
from test_faults import RUN, ropo_train, tree_digest
from test_ref_cache import other_weights

FAST = [arg for arg in RUN if not arg.startswith(("rejection_sampling", "save_every"))]


@pytest.fixture(scope="module")
def inputs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    data = write_synthetic_pairs(tmp_path_factory.mktemp("run_dir_data") / "pairs.jsonl", 16)
    return [f"model={tiny_model_dir}", f"data={data}", *FAST]


@pytest.fixture(scope="module")
def finished(inputs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with injected noise (so it has flips.json) and two round checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = ropo_train([*inputs, f"out={out}"], cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture()
def used(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, free to be reused, damaged or overwritten."""
    return Path(shutil.copytree(finished, tmp_path / "used"))


def refused(result: subprocess.CompletedProcess, *messages: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()  # progress bars may come first, on stderr too
    assert lines[-1].startswith("ropo: error: ")
    assert sum("ropo: error" in line for line in lines) == 1
    for message in messages:
        assert message in result.stderr, result.stderr


def test_fresh_run_into_a_used_directory_is_refused(
    inputs: list[str], used: Path, tmp_path: Path
) -> None:
    before = tree_digest(used)
    result = ropo_train([*inputs, f"out={used}", "lr=1e-3"], cwd=tmp_path)
    refused(
        result,
        f"{used}: the run directory is not empty (cache, checkpoints, cleaned.jsonl,",
        f"`ropo train resume={used}`",
        "overwrite=true",
    )
    assert tree_digest(used) == before


def test_overwrite_starts_from_an_empty_directory_once_the_run_is_valid(
    inputs: list[str], used: Path, tmp_path: Path
) -> None:
    before = tree_digest(used)
    broken = [*inputs, f"out={used}", "overwrite=true", f"model={tmp_path / 'missing'}"]
    refused(ropo_train(broken, cwd=tmp_path), str(tmp_path / "missing"))
    assert tree_digest(used) == before  # a run that cannot start deletes nothing

    old_id = json.loads((used / "run.json").read_text())["run_id"]
    args = [*inputs, f"out={used}", "overwrite=true", "noise=0", "rounds=1"]
    result = ropo_train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads((used / "run.json").read_text())
    assert info["run_id"] != old_id and info["config"]["noise"] == 0
    assert not (used / "flips.json").exists()  # the old run's, and this one injected no noise
    assert sorted(p.name for p in (used / "checkpoints").iterdir()) == ["LATEST", "round-1"]
    assert [json.loads(line)["round"] for line in open(used / "metrics.jsonl")] == [1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("out={other}", "resume={used} continues the run in {used}, so out= cannot apply"),
        ("overwrite=true", "so overwrite= cannot apply"),
    ],
)
def test_resume_refuses_keys_it_would_ignore(
    extra: str, message: str, used: Path, tmp_path: Path
) -> None:
    before = tree_digest(used)
    values = {"other": tmp_path / "elsewhere", "used": used}
    result = ropo_train([f"resume={used}", extra.format(**values)], cwd=tmp_path)
    refused(result, message.format(**values))
    assert tree_digest(used) == before and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda info: "", "run.json:1: not valid JSON"),
        (lambda info: json.dumps(info)[:200], "run.json:1: not valid JSON"),
        (lambda info: "[]", "run.json: expected a JSON object, got list"),
        (lambda info: json.dumps({k: v for k, v in info.items() if k != "config"}),
         "run.json: field 'config' is missing, expected a dict"),
        (lambda info: json.dumps({k: v for k, v in info.items() if k != "run_id"}),
         "run.json: field 'run_id' is missing, expected a str (written by a ropo without run"),
        (lambda info: json.dumps({**info, "inputs": 3}),
         "run.json: field 'inputs' is a int, expected a dict"),
    ],
)  # fmt: skip
def test_damaged_run_json_is_named_with_its_field(
    damage: object, message: str, used: Path, tmp_path: Path
) -> None:
    run_json = used / "run.json"
    run_json.write_text(damage(json.loads(run_json.read_text())))  # type: ignore[operator]
    before = tree_digest(used)
    refused(ropo_train([f"resume={used}"], cwd=tmp_path), f"{used}/{message}")
    assert tree_digest(used) == before


def test_state_json_without_loop_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, "round-1", model, optimizer, {"config": {}, "run_id": "r1"})
    assert latest_checkpoint(tmp_path, "r1") == path  # its files are whole: only the field lacks
    with pytest.raises(ValueError, match=r"round-1/state.json: field 'loop' is missing"):
        load_checkpoint(path, lambda p: load_model(p), torch.optim.AdamW, "cpu")


def test_resume_refuses_a_reference_changed_since_the_run_started(
    inputs: list[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    reference = other_weights(tiny_model_dir, tmp_path / "reference", seed=1)
    out = tmp_path / "run"
    train(load_config(None, [*inputs, f"out={out}", f"reference={reference}", "rounds=1"]))
    info = json.loads((out / "run.json").read_text())
    assert info["inputs"]["reference"]["path"] == str(reference)
    save_model(randomize_(load_model(reference), seed=2), reference)
    before = tree_digest(out)
    with pytest.raises(ValueError, match=r"resume refused: the reference \(.*\) changed since"):
        train(load_config(None, [f"resume={out}"], base=info["config"]))
    assert tree_digest(out) == before


def test_out_naming_a_file_is_refused(inputs: list[str], tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("mine")
    refused(ropo_train([*inputs, f"out={target}"], cwd=tmp_path), f"{target}: out= names an")
    assert target.read_text() == "mine"


@pytest.mark.parametrize("missing", ["model", "data", "model and data", "tokenizer"])
def test_a_start_that_fails_on_its_inputs_leaves_no_run_directory(
    missing: str, inputs: list[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`ropo train model=/nonexistent data=x.jsonl out=D` once left D/ holding only ropo.lock:
    the lock was taken before the inputs were checked. Missing inputs are now found before the
    directory is made, and a start that fails after the lock (a model directory without its
    tokenizer) removes what the lock made, parent directories included."""
    no_tokenizer = Path(shutil.copytree(tiny_model_dir, tmp_path / "no_tokenizer"))
    for name in ("tokenizer.model", "tokenizer.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    model, data = inputs[0], inputs[1]
    nowhere_model, nowhere_data = tmp_path / "nonexistent", tmp_path / "x.jsonl"
    args, message = {
        "model": ([f"model={nowhere_model}", data], f"model directory {nowhere_model} does not"),
        "data": ([model, f"data={nowhere_data}"], f"data file {nowhere_data} does not exist"),
        "model and data": (
            [f"model={nowhere_model}", f"data={nowhere_data}"],
            "2 inputs are missing",
        ),
        "tokenizer": ([f"model={no_tokenizer}", data], "tokenizer file"),
    }[missing]
    out = tmp_path / "made" / "for" / "run"
    result = ropo_train([*args, *FAST, f"out={out}"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "ropo: error: " in result.stderr and message in result.stderr, result.stderr
    assert not (tmp_path / "made").exists()


# --- read-only and full file systems, in a mount namespace of their own -------------------------


def in_namespace(mounts: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`ropo train ARGS` after running the shell `mounts` in a private mount namespace."""
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare: {probe.stderr.decode().strip()})")
    script = f'{mounts} && exec "$@"'
    command = ["unshare", "-r", "-m", "sh", "-c", script, "sh"]
    result = ropo_train(args, cwd=cwd, wrapper=command)
    return result


@pytest.mark.parametrize("where", ["out", "parent", "cache_dir"])
def test_read_only_places_are_refused_up_front(
    where: str, inputs: list[str], tmp_path: Path
) -> None:
    frozen = tmp_path / "frozen"
    (frozen / "run").mkdir(parents=True)
    (frozen / "run" / "notes.txt").write_text("kept")
    args = {
        "out": [f"out={frozen / 'run'}", "overwrite=true"],
        "parent": [f"out={frozen / 'new'}"],
        "cache_dir": [f"out={tmp_path / 'run'}", f"cache_dir={frozen / 'cache'}"],
    }[where]
    mount = f"mount --bind -o ro {frozen} {frozen}"
    result = in_namespace(mount, [*inputs, *args], cwd=tmp_path)
    key = "cache_dir" if where == "cache_dir" else "out"
    target = {"out": frozen / "run", "parent": frozen, "cache_dir": frozen}[where]
    refused(result, f"{target}: not writable, so nothing can be written to {key}=")
    assert (frozen / "run" / "notes.txt").read_text() == "kept"


def test_a_full_disk_is_one_line_with_the_way_on(inputs: list[str], tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    # Room for run.json and the reference cache, not for a checkpoint of the model.
    mount = f"mount -t tmpfs -o size=96k tmpfs {small}"
    result = in_namespace(mount, [*inputs, f"out={small / 'run'}"], cwd=tmp_path)
    refused(result, "No space left on device", f"`ropo train resume={small / 'run'}` continues")
