"""Faults never lose work: a run killed at any point resumes to what an uninterrupted run gives.

The kill tests start `ropo train` as a subprocess through tests/fault_launcher.py with
ROPO_FAULT=<point>:<n>, which sends SIGKILL at a precise place: mid-step, mid-checkpoint-write,
between rounds, during rejection sampling. `ropo train resume=<run>` must then end with the same
final weights (compared exactly), kept set and audit files as a run that was never interrupted.
The rest checks the pieces in-process: checkpoint integrity (manifest, checksums, stale temp
directories), atomic writes, torn audit lines, and NaN/inf steps (stop at the last good
checkpoint, or skip_nonfinite=true).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_launcher
import ropo.step as step_module
from conftest import WORDS, write_synthetic_pairs
from ropo.checkpoint import latest_checkpoint, save_checkpoint, verify_checkpoint
from ropo.cli import main
from ropo.data import load_pairs, tokenize_pairs
from ropo.jsonl import truncate_jsonl
from ropo.logps import PairLogps
from ropo.loss import get_loss
from ropo.models import load_model, load_tokenizer, save_model
from ropo.models.files import write_atomic
from ropo.models.tokenizer import train_tokenizer
from ropo.ref_cache import RefLogps
from ropo.step import StepSettings, train_step

# Two rounds of 16 pairs in steps of 4, a checkpoint every 2 steps, rejection sampling after
# round 1: round 1 is steps 1-4 (checkpoints step-2, step-4, round-1), round 2 steps 5-8.
RUN = ("loss=ropo", "rounds=2", "rho=0.25", "noise=0.25", "batch_size=4", "lr=3e-3",
       "warmup_ratio=0", "max_length=64", "log_every=1", "save_every=2", "device=cpu",
       "rejection_sampling=true", "rs_k=2", "rs_max_new_tokens=4")  # fmt: skip
AUDIT_FILES = ("pairs.jsonl", "metrics.jsonl", "cleaned.jsonl", "train_log.jsonl",
               "sampled_pairs.jsonl", "flips.json")  # fmt: skip


def ropo_train(
    args: list[str], cwd: Path, fault: str = "", wrapper: list[str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m ropo train ARGS` in a fresh process (after `wrapper`, a command that runs its
    arguments); with a `fault`, through tests/fault_launcher.py with ROPO_FAULT=`fault`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPO_FAULT": fault}
    ropo = fault_launcher.command() if fault else [sys.executable, "-m", "ropo"]
    command = [*(wrapper or []), *ropo, "train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_inputs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    data = write_synthetic_pairs(tmp_path_factory.mktemp("fault_data") / "pairs.jsonl", 16)
    return [f"model={tiny_model_dir}", f"data={data}", *RUN]


@pytest.fixture(scope="module")
def uninterrupted(run_inputs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = ropo_train([*run_inputs, f"out={out}"], cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    for name in AUDIT_FILES:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    ours = load_model(run / "final").state_dict()
    for name, value in load_model(reference / "final").state_dict().items():
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("step:3", "step-0000002"),  # mid-step in round 1: gradients there, no AdamW update yet
        ("checkpoint:4", "round-1"),  # writing step-6 in round 2: files there, no manifest
        ("rejection_sampling:1", "step-0000004"),  # round 1 audit written, no round checkpoint
        ("round_end:1", "step-0000004"),  # audit and sampled pairs written, no round checkpoint
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_result(
    fault: str, resumes_from: str, run_inputs: list[str], uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    killed = ropo_train([*run_inputs, f"out={out}"], cwd=tmp_path, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(out) == out / "checkpoints" / resumes_from
    partial = list((out / "checkpoints").glob(".tmp-*"))  # writes the kill cut short
    if fault.startswith("checkpoint"):  # weights there, no manifest, never renamed into place
        assert len(partial) == 1 and partial[0].name.startswith(".tmp-step-0000006-")
        assert (partial[0] / "model.safetensors").is_file()
        assert not (partial[0] / "manifest.json").exists()
    else:
        assert not partial
    if fault.startswith("round_end"):  # as if the kill had also cut appends short
        for name in ("pairs.jsonl", "metrics.jsonl", "train_log.jsonl", "sampled_pairs.jsonl"):
            with open(out / name, "ab") as handle:
                handle.write(b'{"id": "p1", "round": 0, "pol')

    resumed = ropo_train([f"resume={out}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: {out / 'checkpoints' / resumes_from}" in resumed.stdout
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the stale directory was removed
    assert_same_run(out, uninterrupted)


def test_fault_spec_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for typo in ("stpe:1", "step:0", "step", "step:1:SIGHUP"):  # must not quietly never fire
        with pytest.raises(ValueError, match=f"ROPO_FAULT='{typo}'"):
            fault_launcher.install(typo, monkeypatch.setattr)
    apply_step = step_module.apply_step
    fault_launcher.install("round_end:2", monkeypatch.setattr)
    assert step_module.apply_step is apply_step  # another point: nothing changes there
    for point in fault_launcher.POINTS:  # each still names functions the library calls there
        fault_launcher.install(f"{point}:1", monkeypatch.setattr)
    for module, name in fault_launcher.POINTS["step"].targets:  # each wrapped once: one count
        assert getattr(importlib.import_module(module), name).__wrapped__ is apply_step


# --- checkpoints -----------------------------------------------------------------------------


def small_checkpoint(run: Path, model_dir: Path, name: str) -> Path:
    model = load_model(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run, name, model, optimizer, {"loop": {}, "config": {}})


def test_damaged_checkpoint_never_loads_as_complete(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path, tiny_model_dir, "step-0000001")
    assert latest_checkpoint(tmp_path) == path
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is missing or does not match"):
        latest_checkpoint(tmp_path)
    (path / "manifest.json").write_text('{"model.safe')
    with pytest.raises(ValueError, match="manifest.json is unreadable"):
        verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="has no manifest.json: it was not written completely"):
        latest_checkpoint(tmp_path)


def test_stale_temporary_checkpoint_is_ignored_then_removed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = small_checkpoint(tmp_path, tiny_model_dir, "step-0000001")
    stale = tmp_path / "checkpoints" / ".tmp-step-0000002-99999"  # a killed writer's leftovers
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == first
    second = small_checkpoint(tmp_path, tiny_model_dir, "step-0000002")
    assert latest_checkpoint(tmp_path) == second
    assert not stale.exists()


# --- audit files -----------------------------------------------------------------------------


def test_truncate_drops_a_torn_last_line_and_refuses_damage(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"round": 0}\n{"round": 1}\n{"round": 0, "lo')
    truncate_jsonl(path, lambda record: record["round"] < 1)
    assert path.read_bytes() == b'{"round": 0}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]  # no temporary file left
    path.write_bytes(b'{"round": 0}\n{"rou\n{"round": 1}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: unreadable line"):
        truncate_jsonl(path, lambda record: True)


def test_write_atomic_leaves_the_old_file_or_the_whole_new_one(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    write_atomic(path, '{"round": 1}')
    write_atomic(path, b'{"round": 2}', sync=True)
    assert path.read_text() == '{"round": 2}'

    def cut_short(tmp: Path) -> None:
        tmp.write_text('{"rou')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, cut_short)
    assert path.read_text() == '{"round": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


# --- NaN / inf -------------------------------------------------------------------------------


@pytest.fixture()
def step_inputs(tiny_model_dir: Path, tmp_path: Path) -> tuple:
    """A policy, its optimizer, one step of 4 pairs and reference log-probs of 0 for them."""
    tokenizer = load_tokenizer(tiny_model_dir)
    text, _ = load_pairs(write_synthetic_pairs(tmp_path / "pairs.jsonl", 4))
    pairs, _ = tokenize_pairs(text, tokenizer, 64)
    zeros = torch.zeros(4)
    ref = RefLogps([p.id for p in pairs], PairLogps(zeros, zeros, zeros + 1, zeros + 1), "test")
    model = load_model(tiny_model_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    settings = StepSettings(tokenizer.pad_id, 1.0, torch.device("cpu"), None)
    return model, optimizer, [pairs], ref, settings


class NanGradientLoss:
    """DPO whose value is finite but whose gradient is NaN (as after an overflow in backward)."""

    length_normalized = False

    def __call__(self, *logps: torch.Tensor) -> torch.Tensor:
        losses = get_loss("dpo")(*logps)
        losses.register_hook(lambda grad: torch.full_like(grad, math.nan))
        return losses


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_nonfinite_step_applies_nothing(poison: str, step_inputs: tuple) -> None:
    model, optimizer, micro_batches, ref, settings = step_inputs
    if poison == "loss":
        ref.logps.chosen[2] = math.inf  # pair p2's loss becomes NaN
    loss_fn = get_loss("dpo") if poison == "loss" else NanGradientLoss()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = train_step(model, optimizer, micro_batches, ref, loss_fn, 0.1, settings)
    expected = "non-finite loss for pairs ['p2']" if poison == "loss" else "gradient norm nan"
    assert expected in stats.skipped
    assert poison == "loss" or "['p0', 'p1', 'p2', 'p3']" in stats.skipped
    assert not optimizer.state  # AdamW never saw the step: its moments are not poisoned
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[name]), name


def poison_step(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make the policy log-probs of the `call`-th training micro-batch NaN."""
    real, calls = step_module.response_logps, {"n": 0}

    def response_logps(*args: object) -> PairLogps:
        logps = real(*args)
        calls["n"] += 1
        if calls["n"] == call:
            logps = dataclasses.replace(logps, chosen=logps.chosen * math.nan)
        return logps

    monkeypatch.setattr(step_module, "response_logps", response_logps)


def test_nonfinite_loss_stops_at_the_last_good_checkpoint_or_is_skipped(
    run_inputs: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "run"
    args = [*run_inputs, "rounds=1", "rejection_sampling=false", f"out={out}"]
    poison_step(monkeypatch, 3)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "ropo: error: round 1, global step 3: non-finite loss for pairs ['p" in err
    assert f"resume={out}" in err and "skip_nonfinite=true" in err
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", "step-0000002"]
    assert [json.loads(line)["step"] for line in open(out / "train_log.jsonl")] == [1, 2]

    poison_step(monkeypatch, 1)  # the resumed run replays step 3 first
    assert main(["train", f"resume={out}", "skip_nonfinite=true"]) == 0
    printed = capsys.readouterr()
    assert "round 1, global step 3: non-finite loss" in printed.err + printed.out
    assert "skip_nonfinite: 1 steps skipped" in printed.out
    assert json.loads((out / "metrics.jsonl").read_text())["n_skipped_nonfinite"] == 1
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "non-finite loss" in log[2]["skipped"]
    final = load_model(out / "final").state_dict()
    assert all(torch.isfinite(value).all() for value in final.values())


# --- signals: one line, exit 128 + N, and a resume that ends where an uninterrupted run does ---


def test_ctrl_c_stops_with_one_line_and_resumes(
    run_inputs: list[str], uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped = ropo_train([*run_inputs, f"out={out}"], cwd=tmp_path, fault="step:3:SIGINT")
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"ropo: interrupted by SIGINT in round 1/2, epoch 1, after global step 2; last "
        f"checkpoint {out / 'checkpoints' / 'step-0000002'}; continue with "
        f"`ropo train resume={out}`"
    )
    resumed = ropo_train([f"resume={out}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, uninterrupted)


def test_sigterm_checkpoints_at_the_next_step_boundary(
    run_inputs: list[str], uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped = ropo_train([*run_inputs, f"out={out}"], cwd=tmp_path, fault="step:3:SIGTERM")
    assert stopped.returncode == 143, stopped.stderr
    assert "Traceback" not in stopped.stderr
    # Step 3 was finished and saved, although save_every=2 would not have saved it.
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000003"
    assert "interrupted by SIGTERM in round 1/2, epoch 1, after global step 3" in stopped.stderr
    resumed = ropo_train([f"resume={out}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: {out / 'checkpoints' / 'step-0000003'}" in resumed.stdout
    assert_same_run(out, uninterrupted)


def test_sigterm_skips_a_checkpoint_that_would_outlast_the_grace_period(
    run_inputs: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [*run_inputs, f"out={out}", "term_grace=0"]
    stopped = ropo_train(args, cwd=tmp_path, fault="step:3:SIGTERM")
    assert stopped.returncode == 143, stopped.stderr
    assert "SIGTERM: no checkpoint" in stopped.stdout
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000002"


def test_signal_between_steps_names_the_end_of_the_round(
    run_inputs: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped = ropo_train(
        [*run_inputs, f"out={out}"], cwd=tmp_path, fault="rejection_sampling:1:SIGTERM"
    )
    assert stopped.returncode == 143 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "at the end of round 1/2 (scoring or sampling), after global step 4" in stopped.stderr


# --- the run directory: one run, its own checkpoints, its own inputs --------------------------


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file under `root` (the lock file aside) with its bytes: equal means nothing changed."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "ropo.lock"
    }


def test_a_second_run_into_a_live_run_directory_is_refused(
    run_inputs: list[str], uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPO_FAULT": "step:2:SIGSTOP"}
    command = fault_launcher.command("train", *run_inputs, f"out={out}")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _stopped(first.pid):  # frozen mid-step, holding the lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        before = tree_digest(out)
        for args in ([*run_inputs, f"out={out}"], [f"resume={out}"]):
            second = ropo_train(args, cwd=tmp_path)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
            assert (
                f"another ropo run (pid {first.pid}) is using this run directory" in second.stderr
            )
        assert tree_digest(out) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert_same_run(out, uninterrupted)  # no duplicated rounds, no jumbled log


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "T"


def test_resume_refuses_a_checkpoint_of_another_run(
    run_inputs: list[str], uninterrupted: Path, tmp_path: Path
) -> None:
    # The case: a copy of finished run A, reused for run B, which died before its first
    # checkpoint; with A's checkpoints still in the directory, resume must not pick them up.
    out = tmp_path / "run"
    killed = ropo_train([*run_inputs, f"out={out}", "lr=1e-3"], cwd=tmp_path, fault="step:1")
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "checkpoints").exists()
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    before = tree_digest(out)
    resumed = ropo_train([f"resume={out}"], cwd=tmp_path)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    ours = json.loads((out / "run.json").read_text())["run_id"]
    theirs = json.loads((uninterrupted / "run.json").read_text())["run_id"]
    assert ours != theirs
    assert f"was written by run {theirs}, but {out / 'run.json'} is run {ours}" in resumed.stderr
    assert tree_digest(out) == before


def test_resume_falls_back_past_a_damaged_newest_checkpoint(
    run_inputs: list[str], uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    killed = ropo_train([*run_inputs, f"out={out}"], cwd=tmp_path, fault="round_end:1")
    assert killed.returncode == -signal.SIGKILL
    newest = out / "checkpoints" / "step-0000004"
    assert latest_checkpoint(out) == newest
    (newest / "optimizer.safetensors").write_bytes(b"garbage")
    resumed = ropo_train([f"resume={out}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {newest}: optimizer.safetensors is missing or does not match" in (
        resumed.stdout
    )
    assert f"using {out / 'checkpoints' / 'step-0000002'}, the newest one that verifies" in (
        resumed.stdout
    )
    assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("changed", ["data", "model", "tokenizer"])
def test_resume_refuses_inputs_changed_since_the_run_started(
    changed: str, tiny_model_dir: Path, run_inputs: list[str], tmp_path: Path
) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "run"
    args = [f"model={model}", f"data={data}", *run_inputs[2:], f"out={out}"]
    killed = ropo_train(args, cwd=tmp_path, fault="step:3")
    assert killed.returncode == -signal.SIGKILL
    swapped = {"data": data, "model": model / "model.safetensors",
               "tokenizer": model / "tokenizer.model"}[changed]  # fmt: skip
    original = swapped.read_bytes()
    if changed == "data":
        write_synthetic_pairs(data, 16, seed=1)  # same ids, other pairs
    elif changed == "model":
        weights = load_model(model)
        with torch.no_grad():
            next(weights.parameters()).mul_(1.01)
        save_model(weights, model)
    else:  # another tokenizer of the same size, trained on other text
        sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 8
        other = train_tokenizer(sentences + ["Question: Answer:"], tmp_path / "tok", vocab_size=300)
        shutil.copy(tmp_path / "tok" / "tokenizer.model", swapped)
        assert other.vocab_size <= 300  # still fits the model: only the fingerprint tells
    before = tree_digest(out)
    resumed = ropo_train([f"resume={out}"], cwd=tmp_path)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    assert f"resume refused: the {changed} (" in resumed.stderr
    assert "changed since the run started" in resumed.stderr
    assert tree_digest(out) == before
    swapped.write_bytes(original)  # the original back: the run goes on
    assert ropo_train([f"resume={out}"], cwd=tmp_path).returncode == 0
