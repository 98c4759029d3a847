"""Every error a user can cause ends in one line, `ropo: error: <file>[:<line>]: ...`, and exit 2.

The cases of issue 12, each run as a user runs them: `python -m ropo train ...` in a fresh process.
Every test checks the exit code, that no traceback is printed, that the one line names the file
(and line) and the field, and that the inputs (model directory, data and config files) are byte
for byte what they were before. The pieces are unit-tested in test_load.py, test_data.py,
test_config.py and test_memory.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WORDS, write_synthetic_pairs
from ropo.models import load_model, save_model

RUN = ("loss=dpo", "rounds=1", "rho=0", "batch_size=16", "max_length=64", "device=cpu")
NOWHERE = ("model=no/such/model", "data=no/such/data.jsonl")  # an error must come before these


def ropo_train(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m ropo train ARGS` in a fresh process (a minute at most: a hang is a failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ropo", "train", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def tree_digest(*paths: Path) -> str:
    """sha256 over the names, kinds and bytes of every file under `paths`. A symlink counts by its
    target and a FIFO or device by its kind: neither is ever opened, as opening one could hang."""
    digest = hashlib.sha256()
    for root in paths:
        for path in sorted([root, *root.rglob("*")]) if root.is_dir() else [root]:
            digest.update(f"{path}\0{stat.S_IFMT(os.lstat(path).st_mode)}\0".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def refused(inputs: list[Path], *args: str | Path, cwd: Path) -> str:
    """Run `ropo train ARGS`; assert exit code 2, one error line, no traceback and `inputs`
    unchanged; return that line."""
    before = tree_digest(*inputs)
    result = ropo_train(*args, cwd=cwd)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("ropo: error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, whatever went wrong
    assert tree_digest(*inputs) == before, "an input was changed"
    return result.stderr


@pytest.fixture()
def model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model directory, free to be damaged."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_synthetic_pairs(tmp_path / "pairs.jsonl", 8)


def train_args(model: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [f"model={model}", f"data={data}", f"out={tmp_path / 'out'}", *RUN, *extra]


# --- the model directory ---------------------------------------------------------------------

DAMAGE = {  # how a download or a copy can leave model.safetensors
    "truncated": lambda raw: raw[:-100],
    "garbage": lambda raw: random.Random(0).randbytes(len(raw)),
    "empty": lambda raw: b"",
    "header_cut_short": lambda raw: raw[:40],
}  # more kinds of damage, each with its message, in test_load.py


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_weights_are_named(damage: str, model: Path, data: Path, tmp_path: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(DAMAGE[damage](weights.read_bytes()))
    err = refused([model, data], *train_args(model, data, tmp_path), cwd=tmp_path)
    assert f"ropo: error: {weights}: damaged safetensors file" in err, err


SPECIAL_FILES = [  # (file in the model directory, what replaces it, the kind the message names)
    ("model.safetensors", "/dev/zero", "a character device"),
    ("model.safetensors", "fifo", "a FIFO (named pipe)"),
    ("config.json", "fifo", "a FIFO (named pipe)"),
    ("tokenizer.model", "fifo", "a FIFO (named pipe)"),
]


@pytest.mark.parametrize(("name", "replacement", "kind"), SPECIAL_FILES)
def test_special_file_in_the_model_is_named_not_read(
    name: str, replacement: str, kind: str, model: Path, data: Path, tmp_path: Path
) -> None:
    (model / name).unlink()
    if replacement == "fifo":
        os.mkfifo(model / name)  # opening it would wait for a writer forever
    else:
        (model / name).symlink_to(replacement)  # reading it would never end
    err = refused([model, data], *train_args(model, data, tmp_path), cwd=tmp_path)
    assert f"ropo: error: {model / name}: is {kind}, not a regular file" in err, err


def sharded(model: Path) -> Path:
    """Re-save `model` as shards with an index; returns the index file."""
    save_model(load_model(model), model, max_shard_bytes=20_000)
    return model / "model.safetensors.index.json"


def config_as_list(model: Path) -> tuple[Path, str]:
    config = model / "config.json"
    config.write_text(json.dumps([json.loads(config.read_text())]))
    return config, "expected a JSON object of model settings, got list"


def hidden_size_as_string(model: Path) -> tuple[Path, str]:
    config = model / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"hidden_size": "32"}))
    return config, "field 'hidden_size' = '32' must be a positive integer"


def index_without_weight_map(model: Path) -> tuple[Path, str]:
    index = sharded(model)
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    return index, "field 'weight_map' is missing"


@pytest.mark.parametrize("edit", [config_as_list, hidden_size_as_string, index_without_weight_map])
def test_wrong_json_structure_names_file_and_field(
    edit, model: Path, data: Path, tmp_path: Path
) -> None:  # fmt: skip
    file, message = edit(model)
    err = refused([model, data], *train_args(model, data, tmp_path), cwd=tmp_path)
    assert f"ropo: error: {file}: {message}" in err, err


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_malformed_json_names_file_and_line(
    name: str, model: Path, data: Path, tmp_path: Path
) -> None:
    if name != "config.json":
        sharded(model)
    file = model / name
    lines = json.dumps(json.loads(file.read_text()), indent=2).splitlines()
    cut = next(i for i, line in enumerate(lines) if line.endswith(","))
    lines[cut] = lines[cut].removesuffix(",")  # json notices on the next line: number cut + 2
    file.write_text("\n".join(lines) + "\n")
    err = refused([model, data], *train_args(model, data, tmp_path), cwd=tmp_path)
    assert f"ropo: error: {file}:{cut + 2}: not valid JSON: Expecting ',' delimiter" in err, err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_length=300", "config key 'max_length' = 300 is more than the model's "
         "max_position_embeddings = 256"),
        ("lora_rank=17", "config key 'lora_rank' = 17 is more than the narrowest side of an "
         "adapted projection, num_key_value_heads * head_dim = 16"),
    ],
)  # fmt: skip
def test_settings_beyond_the_model_name_key_and_config_json(
    setting: str, message: str, model: Path, data: Path, tmp_path: Path
) -> None:
    err = refused([model, data], *train_args(model, data, tmp_path, setting), cwd=tmp_path)
    assert message in err and f"({model / 'config.json'})" in err, err


# --- the data file ---------------------------------------------------------------------------


def test_lone_surrogate_in_the_data_names_file_and_line(
    model: Path, data: Path, tmp_path: Path
) -> None:
    with open(data, "a", encoding="utf-8") as handle:  # line 9, with the JSON escape \ud800
        handle.write(
            '{"id": "s", "prompt": "Question: \\ud800", "chosen": " a", "rejected": " b"}\n'
        )
    err = refused([model, data], *train_args(model, data, tmp_path), cwd=tmp_path)
    assert f"ropo: error: {data}:9: a string holds a lone surrogate escape" in err, err


def test_a_directory_as_data_is_named(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_synthetic_pairs(folder / "pairs.jsonl", 4)
    err = refused([model, folder], *train_args(model, folder, tmp_path), cwd=tmp_path)
    assert f"ropo: error: {folder}: is a directory; data must be a JSONL file" in err, err


def parquet(folder: Path) -> Path:
    (folder / "train.parquet").write_bytes(b"PAR1" + bytes(64) + b"PAR1")
    return folder / "train.parquet"


def arrow_file(folder: Path) -> Path:
    (folder / "train.feather").write_bytes(b"ARROW1\0\0" + bytes(64) + b"ARROW1")
    return folder / "train.feather"


def arrow_stream(folder: Path) -> Path:  # what save_to_disk writes: no magic bytes
    (folder / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff" + bytes(64))
    return folder / "data-00000-of-00001.arrow"


def saved_to_disk(folder: Path) -> Path:
    saved = folder / "ultrafeedback"
    saved.mkdir()
    arrow_stream(saved)
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text(
        '{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}'
    )
    return saved


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (parquet, "is a parquet file, but data must be JSONL; export it with datasets.load_"),
        (arrow_file, "is an Arrow file, but data must be JSONL; export it with datasets.Dataset"),
        (arrow_stream, "is an Arrow file, but data must be JSONL"),
        (saved_to_disk, "is a Hugging Face `datasets` folder (save_to_disk), but data must be a "
         "JSONL file; export it with datasets.load_from_disk("),
    ],
)  # fmt: skip
def test_dataset_exports_say_how_to_get_jsonl(
    make, message: str, model: Path, tmp_path: Path
) -> None:
    export = make(tmp_path)
    err = refused([model, export], *train_args(model, export, tmp_path), cwd=tmp_path)
    assert f"ropo: error: {export}: {message}" in err and ".to_json('pairs.jsonl')" in err, err


def tldr_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        post = " ".join(rng.choice(WORDS) for _ in range(4))
        info = {"id": f"t{i}", "post": post, "title": "t", "subreddit": "s"}
        first, second = rng.sample(WORDS, 2)
        rows.append({"info": info, "summaries": [{"text": first}, {"text": second}], "choice": 0})
    return rows


@pytest.fixture()
def tldr_with_null_post(tmp_path: Path) -> Path:
    rows = tldr_rows(4)
    rows.insert(2, rows[0] | {"info": rows[0]["info"] | {"post": None}})  # line 3
    path = tmp_path / "tldr.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_null_post_is_skipped_and_counted(
    model: Path, tldr_with_null_post: Path, tmp_path: Path
) -> None:
    data = tldr_with_null_post
    before = tree_digest(model, data)
    args = train_args(model, data, tmp_path, "format=tldr", "max_length=128")
    result = ropo_train(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{data}: read 5 pairs, used 4, skipped 1 (null_post: 1)" in result.stdout
    assert tree_digest(model, data) == before


def test_null_post_with_strict_data_names_file_and_line(
    model: Path, tldr_with_null_post: Path, tmp_path: Path
) -> None:
    data = tldr_with_null_post
    args = train_args(model, data, tmp_path, "format=tldr", "max_length=128", "strict_data=true")
    err = refused([model, data], *args, cwd=tmp_path)
    assert f"ropo: error: {data}:3: field 'info.post' is null" in err, err


# --- the configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("device", ["tpu", "CPU", "cuda:abc", "meta", "cuda:-1"])
def test_bad_device_is_refused_with_the_config(device: str, tmp_path: Path) -> None:
    err = refused([], *NOWHERE, f"device={device}", cwd=tmp_path)
    assert f"command line 'device={device}': config key 'device' = '{device}'" in err, err
    assert "is not one of auto, cpu, cuda, cuda:N" in err


def test_bad_device_in_a_config_file_names_its_line(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("loss: dpo\ndevice: meta\n")
    err = refused([config], "--config", config, *NOWHERE, cwd=tmp_path)
    assert f"ropo: error: {config}:2: config key 'device' = 'meta'" in err, err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("alpha=1.5", "config key 'alpha': ROPO alpha must be a finite number > 2, got 1.5"),
        ("alpha=.inf", "config key 'alpha': ROPO alpha must be a finite number > 2, got inf"),
        ("label_smoothing=0.6", "config key 'label_smoothing': label_smoothing must be in "
         "[0, 0.5), got 0.6"),
        ("label_smoothing=-0.1", "config key 'label_smoothing': label_smoothing must be in "
         "[0, 0.5), got -0.1"),
        ("beta=0", "config key 'beta': beta must be a finite number > 0, got 0.0"),
    ],
)  # fmt: skip
def test_loss_keys_are_checked_before_model_and_data(
    setting: str, message: str, tmp_path: Path
) -> None:
    # loss=dpo uses neither alpha nor label_smoothing; a bad value is refused all the same.
    err = refused([], *NOWHERE, "loss=dpo", setting, cwd=tmp_path)
    assert f"ropo: error: command line '{setting}': {message}" in err, err


def test_a_bad_alpha_stops_the_run_before_it_creates_anything(
    model: Path, data: Path, tmp_path: Path
) -> None:
    # Model and data are fine: the config alone is wrong, and it is checked when it is read,
    # before the run directory, the process group, the tokenizer or the memory check.
    args = train_args(model, data, tmp_path, "loss=ropo", "alpha=1.5")
    err = refused([model, data], *args, cwd=tmp_path)
    assert "ropo: error: command line 'alpha=1.5': config key 'alpha'" in err, err
    assert not (tmp_path / "out").exists()


def test_repeated_yaml_key_names_both_lines(model: Path, data: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("loss: dpo\nrho: 0.0\nrounds: 1\nrho: 0.2\n")
    args = ["--config", config, *train_args(model, data, tmp_path)]
    err = refused([model, data, config], *args, cwd=tmp_path)
    assert f"ropo: error: {config}:4: key 'rho' is set twice (also on line 2)" in err, err


def test_a_directory_as_config_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    err = refused([folder], "--config", folder, *NOWHERE, cwd=tmp_path)
    assert f"ropo: error: {folder}: is a directory; --config expects a YAML file" in err, err


def test_the_dead_key_eval_every_round_is_gone(tmp_path: Path) -> None:
    err = refused([], *NOWHERE, "eval_every_round=false", cwd=tmp_path)
    assert "command line 'eval_every_round=false': unknown config key 'eval_every_round'" in err
