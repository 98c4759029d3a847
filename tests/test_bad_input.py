"""Bad input, end to end: `ropo train` exits with 2 and one clear line, never a traceback.

Every case goes through the command line (`ropo.cli.main`), so what is checked is what a user
sees: `ropo: error: <file:line or key>: <what is wrong>` on stderr, or a counted skip in the data
summary (stdout and run.json). Errors about the model and the tokenizer must come before the data
is read, as a 7B run should fail in a second, not after minutes of tokenising.

The layer below is tested in detail elsewhere: every malformed-record variant of every data format
in tests/test_data.py (test_malformed_line_names_file_and_line, test_skips_are_counted,
test_file_level_errors); config keys, types and ranges in tests/test_config.py; missing, unexpected
and misshapen tensors, missing shards and unsupported config.json fields in tests/test_load.py;
tokenizer files in tests/test_tokenizer.py; NaN/inf during training in tests/test_faults.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import ropo.run_setup as run_setup
from conftest import write_synthetic_pairs
from ropo.cli import main
from ropo.config_load import load_config
from ropo.models import Transformer, load_model, load_tokenizer, save_model
from ropo.training_run import run_inputs

GOOD = {"id": "p0", "prompt": "Question: apple Answer:", "chosen": " apple", "rejected": " kilo"}
BAD_LINES = [  # line 2 of the data file, the message that must name it
    (b"{not json", "bad.jsonl:2: bad JSON"),
    (b'{"id": "a", "prompt": "q", "chosen": "x"}', "bad.jsonl:2: missing field 'rejected'"),
    (b'{"id": "a", "prompt": " ", "chosen": "x", "rejected": "y"}', "bad.jsonl:2: empty prompt"),
    (b'{"id": "a", "prompt": "q", "chosen": 5, "rejected": "y"}',
     "bad.jsonl:2: field 'chosen' must be string, got integer"),
    (b'{"id": "a", "prompt": "q", "chosen": NaN, "rejected": "y"}',
     "bad.jsonl:2: field 'chosen' must be string, got number"),
    (b'{"id": "a", "prompt": "q", "chosen": "x", "rejected": null}',
     "bad.jsonl:2: field 'rejected' must be string, got null"),
    (b'{"id": "p0", "prompt": "q", "chosen": "x", "rejected": "y"}',
     "bad.jsonl:2: duplicate id 'p0', first used at"),
    (b'{"id": "a", "prompt": "caf\xe9", "chosen": "x", "rejected": "y"}',
     "bad.jsonl:2: not valid UTF-8"),
]  # fmt: skip


def ropo_train(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `ropo train ARGS`."""
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={model_dir}", f"data={data}", f"out={out}", "loss=dpo", "rounds=1", "rho=0",
            "batch_size=16", "max_length=64", "device=cpu", *extra]  # fmt: skip


@pytest.fixture()
def good_data(tmp_path: Path) -> Path:
    return write_synthetic_pairs(tmp_path / "good.jsonl", 4)


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model directory, free to be damaged."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture()
def data_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run gets as far as reading its data (the slow part before training)."""

    def fail(*args: object) -> None:
        raise AssertionError("the data was read before the model and tokenizer were checked")

    monkeypatch.setattr(run_setup, "prepare_data", fail)


# --- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_data_line_is_named(
    line: bytes, message: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n")
    code, _, err = ropo_train(capsys, *run_args(tiny_model_dir, data, tmp_path / "out"))
    assert code == 2
    assert err.startswith("ropo: error: ") and message in err, err
    assert "Traceback" not in err


def test_empty_or_unusable_data_file(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\n")
    code, _, err = ropo_train(capsys, *run_args(tiny_model_dir, data, tmp_path / "out1"))
    assert code == 2 and "bad.jsonl: no pairs (the file is empty" in err
    long_prompt = "Question: " + "apple " * 80 + "Answer:"
    data.write_text(json.dumps({**GOOD, "prompt": long_prompt}) + "\n")
    code, _, err = ropo_train(capsys, *run_args(tiny_model_dir, data, tmp_path / "out2"))
    assert code == 2 and "no usable pairs left (read 1 pairs, used 0, skipped 1 (prompt_too" in err
    missing = tmp_path / "no.jsonl"
    code, _, err = ropo_train(capsys, *run_args(tiny_model_dir, missing, tmp_path / "out3"))
    assert code == 2 and "data file" in err and "no.jsonl does not exist" in err


def test_skipped_pairs_are_counted_and_reported(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_synthetic_pairs(tmp_path / "mixed.jsonl", 8)
    no_id = {"prompt": "Question: fox Answer:", "chosen": " fox", "rejected": " golf"}
    extra = [
        {**GOOD, "id": "same", "rejected": GOOD["chosen"]},  # chosen == rejected
        {**GOOD, "id": "blank", "rejected": "  "},  # nothing to compare against
        {**GOOD, "id": "long", "prompt": "Question: " + "kilo " * 80 + "Answer:"},
        no_id,
        no_id,  # an exact repeat without an id
    ]
    with open(data, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in extra)
    out = tmp_path / "out"
    code, printed, err = ropo_train(capsys, *run_args(tiny_model_dir, data, out))
    assert code == 0, err
    summary = (
        f"{data}: read 13 pairs, used 9, skipped 4 (duplicate_pair: 1, empty_response: 1, "
        f"identical_responses: 1, prompt_too_long: 1)"
    )
    assert summary in printed.splitlines()
    assert json.loads((out / "run.json").read_text())["data_report"] == summary
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 9


def test_max_pairs_cut_is_counted(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 10)
    cfg = load_config(None, run_args(tiny_model_dir, data, tmp_path, "max_pairs=6"))
    prepared = run_setup.prepare_data(cfg, load_tokenizer(tiny_model_dir), run_inputs(cfg))
    assert len(prepared.tokens) == 6
    assert "read 10 pairs, used 6, skipped 4 (beyond_max_pairs: 4)" in prepared.summary


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "override", "message"),
    [
        (None, "nosie=0.1", "command line 'nosie=0.1': unknown config key 'nosie' (did you mean"),
        (None, "rounds=two", "command line 'rounds=two': config key 'rounds' expects int"),
        (None, "lr=.nan", "config key 'lr' = nan must be > 0.0"),
        (None, "beta=", "command line 'beta=': config key 'beta' expects float, got ''"),
        (None, "out=[runs", "command line 'out=[runs': not valid YAML"),
        ("loss: ropo\nbetta: 0.1\n", None, "cfg.yaml:2: unknown config key 'betta'"),
        ("rounds: two\n", None, "cfg.yaml:1: config key 'rounds' expects int, got 'two'"),
        ("loss: ropo\nbeta:\n", None, "cfg.yaml:2: config key 'beta' expects float, got None"),
        ("loss: ropo\nrho: [0.1\n", None, "cfg.yaml: not valid YAML"),
        ("- a list\n", None, "cfg.yaml: expected a mapping of key: value"),
        (b"loss: r\xe9\n", None, "cfg.yaml: not valid UTF-8"),
    ],
)
def test_bad_config_is_named(
    yaml_text: str | bytes | None, override: str | None, message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    args = [override] if override else []
    if yaml_text is not None:
        config_file = tmp_path / "cfg.yaml"
        raw = yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode()
        config_file.write_bytes(raw)
        args = ["--config", str(config_file), *args]
    code, _, err = ropo_train(capsys, *args)
    assert code == 2 and message in err, err


def test_bad_loss_parameter_fails_before_the_data(
    tiny_model_dir: Path, good_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    data_never_read: None,
) -> None:  # fmt: skip
    args = run_args(tiny_model_dir, good_data, tmp_path / "out", "loss=ropo", "alpha=.inf")
    code, _, err = ropo_train(capsys, *args)
    assert code == 2 and "alpha must be a finite number > 2, got inf" in err, err


def test_resume_of_a_directory_that_is_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = ropo_train(capsys, f"resume={tmp_path}")
    assert code == 2 and f"{tmp_path}/run.json: not found; resume= takes a ropo run dir" in err


# --- model and tokenizer ---------------------------------------------------------------------


def test_tokenizer_larger_than_the_embedding_fails_before_the_data(
    tiny_model_dir: Path, good_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    data_never_read: None,
) -> None:  # fmt: skip
    config = dataclasses.replace(load_model(tiny_model_dir).config, vocab_size=200)
    model_dir = tmp_path / "small_vocab"
    save_model(Transformer(config), model_dir)
    shutil.copy(tiny_model_dir / "tokenizer.model", model_dir / "tokenizer.model")
    code, _, err = ropo_train(capsys, *run_args(model_dir, good_data, tmp_path / "out"))
    assert code == 2
    assert "tokenizer.model has 300 pieces but the model's embedding has 200 rows" in err, err


def test_unsupported_config_json_fails_before_the_data(
    model_copy: Path, good_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    data_never_read: None,
) -> None:  # fmt: skip
    config_file = model_copy / "config.json"
    hf_config = json.loads(config_file.read_text())
    rope_scaling = {"rope_type": "linear", "factor": 2.0}
    config_file.write_text(json.dumps(hf_config | {"rope_scaling": rope_scaling}))
    code, _, err = ropo_train(capsys, *run_args(model_copy, good_data, tmp_path / "out"))
    assert code == 2 and "config.json" in err and "rope_scaling" in err, err


def test_missing_model_files_are_named(
    model_copy: Path, good_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save_model(load_model(model_copy), model_copy, max_shard_bytes=20_000)
    shards = sorted(model_copy.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    code, _, err = ropo_train(capsys, *run_args(model_copy, good_data, tmp_path / "out1"))
    assert code == 2 and f"lists shard files missing from {model_copy}" in err, err
    assert shards[1].name in err
    (model_copy / "tokenizer.model").unlink()
    code, _, err = ropo_train(capsys, *run_args(model_copy, good_data, tmp_path / "out2"))
    assert code == 2 and "tokenizer.model" in err, err
    nowhere = tmp_path / "nowhere"
    code, _, err = ropo_train(capsys, *run_args(nowhere, good_data, tmp_path / "out3"))
    assert code == 2 and "nowhere does not exist" in err, err
