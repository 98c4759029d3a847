"""Held-out pairs during training: eval_data= or eval_split=, scored at the start, after every
round (metrics.jsonl) and every eval_every steps (train_log.jsonl), never trained on or noised."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fault_launcher
import ropo.train as train_module
from conftest import read_jsonl, write_synthetic_pairs
from ropo.cli import main
from ropo.config_load import load_config
from ropo.data import PreferencePair, load_pairs, tokenize_pairs
from ropo.evaluate import heldout_metrics
from ropo.heldout import split_heldout
from ropo.logps_fused import score_pairs
from ropo.models import load_model, load_tokenizer
from ropo.train import train

RUN = ("loss=ropo", "rounds=2", "rho=0.25", "noise=0.25", "batch_size=4", "lr=3e-3",
       "warmup_ratio=0", "max_length=64", "device=cpu")  # fmt: skip
EVAL_FIELDS = {"eval_accuracy", "eval_margin", "eval_loss"}


def run(model_dir: Path, data: Path, out: Path, *extra: str) -> Path:
    return train(
        load_config(None, [f"model={model_dir}", f"data={data}", f"out={out}", *RUN, *extra])
    )


def test_eval_split_is_held_out_of_training_and_noise(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 32)
    trained_ids: set[str] = set()
    real_step = train_module.train_step

    def recording_step(model, optimizer, micro_batches, *args):  # noqa: ANN001, ANN002, ANN202
        trained_ids.update(pair.id for pairs in micro_batches for pair in pairs)
        return real_step(model, optimizer, micro_batches, *args)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    out = run(
        tiny_model_dir, data, tmp_path / "run", "eval_split=0.25", "eval_every=2", "log_every=3"
    )
    info = json.loads((out / "run.json").read_text())
    held = set(info["eval_ids"])
    assert len(held) == 8 and len(trained_ids) == 24 and not held & trained_ids
    assert held.isdisjoint(json.loads((out / "flips.json").read_text()))  # never noised
    assert held.isdisjoint(r["id"] for r in read_jsonl(out / "pairs.jsonl"))
    assert held.isdisjoint(r["id"] for r in read_jsonl(out / "cleaned.jsonl"))
    assert "skipped 8 (held_out_for_eval: 8)" in info["data_report"]
    assert (
        "held-out pairs (eval_split=0.25): read 8 pairs, used 8, skipped 0" in info["data_report"]
    )

    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 and all(EVAL_FIELDS <= set(m) for m in metrics)
    # Before round 1 the policy is the reference: every margin is 0, a tie, the loss ln 2.
    first = metrics[0]
    assert first["eval_accuracy_start"] == 0.0 and first["eval_margin_start"] == 0.0
    assert first["eval_loss_start"] == pytest.approx(math.log(2))
    assert not any(key.endswith("_start") for key in metrics[1])
    log = read_jsonl(out / "train_log.jsonl")
    last_step = 11  # 6 steps of 4 of the 24 training pairs, then 5 of the 18 kept
    assert [r["step"] for r in log if EVAL_FIELDS <= set(r)] == list(range(2, last_step + 1, 2))
    assert [r["step"] for r in log if "loss" in r] == list(range(3, last_step + 1, 3))

    # The last round's numbers are those of the final policy against the reference model.
    pairs, _ = load_pairs(data)
    tokenizer = load_tokenizer(tiny_model_dir)
    tokens, _ = tokenize_pairs([p for p in pairs if p.id in held], tokenizer, max_length=64)
    scores = [
        score_pairs(load_model(model), tokens, 3, tokenizer.pad_id)
        for model in (out / "final", tiny_model_dir)
    ]
    expected = heldout_metrics(*scores, beta=0.1)
    assert metrics[1]["eval_accuracy"] == expected.accuracy
    assert metrics[1]["eval_margin"] == pytest.approx(expected.margin_mean, abs=1e-4)
    assert metrics[1]["eval_loss"] == pytest.approx(expected.loss_mean, abs=1e-5)


def test_eval_data_is_scored_reported_and_fingerprinted(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 16)
    eval_data = write_synthetic_pairs(tmp_path / "eval.jsonl", 6, seed=3)  # ids p0..p5 as well
    with open(eval_data, "a") as handle:
        prompt = "Question: " + "kilo lima " * 40 + "Answer:"  # no room for a response
        handle.write(json.dumps({"id": "long", "prompt": prompt, "chosen": " a", "rejected": " b"}))
    out = run(tiny_model_dir, data, tmp_path / "run", f"eval_data={eval_data}", "log_every=1")
    info = json.loads((out / "run.json").read_text())
    assert info["eval_ids"] == []
    assert info["inputs"]["eval_data"]["path"] == str(eval_data)
    assert (
        f"held-out pairs (eval_data={eval_data}): read 7 pairs, used 6, skipped 1 "
        "(prompt_too_long: 1)" in info["data_report"]
    )
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(EVAL_FIELDS <= set(m) for m in metrics) and "eval_loss_start" in metrics[0]
    assert not any(EVAL_FIELDS & set(r) for r in read_jsonl(out / "train_log.jsonl"))
    assert len(list((out / "cache").glob("ref-logps-*.safetensors"))) == 2  # training, held-out

    eval_data.write_text(eval_data.read_text().replace("kilo", "lima"))
    with pytest.raises(ValueError, match=r"the eval_data \(.*eval\.jsonl\) changed since"):
        train(load_config(None, [f"resume={out}"], base=info["config"]))


def test_split_is_seeded_by_id_not_by_file_order() -> None:
    pairs = [PreferencePair(f"q{i}", "p", f"c{i}", f"r{i}", f"f:{i}") for i in range(40)]
    train_pairs, held = split_heldout(pairs, 0.1, seed=0)
    assert len(held) == 4 and len(train_pairs) == 36
    assert [p.id for p in train_pairs + held] != [p.id for p in pairs]  # not simply the tail
    assert sorted(p.id for p in train_pairs + held) == sorted(p.id for p in pairs)
    _, held_reversed = split_heldout(pairs[::-1], 0.1, seed=0)
    assert {p.id for p in held_reversed} == {p.id for p in held}
    _, held_other_seed = split_heldout(pairs, 0.1, seed=1)
    assert {p.id for p in held_other_seed} != {p.id for p in held}
    assert split_heldout(pairs, 0.0, seed=0) == (pairs, [])
    assert len(split_heldout(pairs[:3], 0.01, seed=0)[1]) == 1  # a share > 0 holds out one at least


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval_data=e.jsonl", "eval_split=0.1"], "give one held-out set, eval_data or eval_split"),
        (["eval_split=0.5"], "config key 'eval_split' = 0.5 must be >= 0.0 and < 0.5"),
        (["eval_split=-0.1"], "config key 'eval_split' = -0.1 must be"),
        (["eval_every=5"], "config key 'eval_every' = 5 needs held-out pairs"),
        (["eval_split=0.1", "eval_every=-1"], "config key 'eval_every' = -1 must be >= 0"),
    ],
)
def test_heldout_keys_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_heldout_errors_are_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 8)
    args = [
        "train",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"out={tmp_path / 'run'}",
        "max_length=64",
    ]
    assert main([*args, f"eval_data={data}", "eval_split=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ropo: error: command line 'eval_split=0.1': config key 'eval_split'")
    assert err.count("\n") == 1
    assert main([*args, f"eval_data={tmp_path / 'missing.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert f"config key 'eval_data': data file {tmp_path / 'missing.jsonl'} does not exist" in err


def ropo_train(args: list[str], cwd: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPO_FAULT": fault}
    ropo = fault_launcher.command() if fault else [sys.executable, "-m", "ropo"]
    command = [*ropo, "train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_killed_run_resumes_to_the_same_heldout_lines(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 20)
    args = [f"model={tiny_model_dir}", f"data={data}", *RUN, "eval_split=0.2", "eval_every=3",
            "log_every=2", "save_every=2"]  # fmt: skip
    whole = ropo_train([*args, f"out={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    killed = ropo_train([*args, f"out={tmp_path / 'killed'}"], cwd=tmp_path, fault="step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = ropo_train([f"resume={tmp_path / 'killed'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "step-0000002" in resumed.stdout  # resumed inside round 1, after the start's scoring
    for name in ("metrics.jsonl", "train_log.jsonl"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert "eval_accuracy_start" in (tmp_path / "killed" / "metrics.jsonl").read_text()


def test_two_processes_score_the_heldout_pairs_like_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 20)
    args = [f"model={tiny_model_dir}", f"data={data}", *RUN, "eval_split=0.2", "eval_every=2"]
    one = run(tiny_model_dir, data, tmp_path / "one", "eval_split=0.2", "eval_every=2")
    # Scored before its first step, the FSDP policy must still train (tensors made under
    # inference_mode could not take FSDP's later in-place all-gathers).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "ropo", "train", *args,
               f"out={tmp_path / 'two'}"]  # fmt: skip
    two = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("metrics.jsonl", "train_log.jsonl"):
        ours, theirs = read_jsonl(tmp_path / "two" / name), read_jsonl(one / name)
        assert len(ours) == len(theirs)
        for line, expected in zip(ours, theirs, strict=True):
            fields = {k: v for k, v in expected.items() if k.startswith("eval_")}
            assert {k: line[k] for k in fields} == pytest.approx(fields, abs=1e-4)
    assert "eval_loss_start" in read_jsonl(tmp_path / "two" / "metrics.jsonl")[0]
