"""torchrun + FSDP2 on the CPU (gloo): two processes compute what one process computes.

Two-process runs are real launches of `python -m torch.distributed.run --standalone
--nproc_per_node=2 -m ropo train`; one-process runs call `train` here. With the same global
batch they must log the same losses, keep the same pairs and end at the same weights (float32
rounding apart: the ranks sum their gradients in another order), and a checkpoint written by
either resumes in the other to the same final weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fault_launcher
import ropo.train as train_module
from conftest import read_jsonl, write_synthetic_pairs
from ropo import distributed
from ropo.checkpoint import latest_checkpoint
from ropo.cli import main
from ropo.config_load import load_config
from ropo.data import TokenizedPair
from ropo.models import load_model
from ropo.train import train

# 21 pairs in micro-batches of 4, two per optimizer step. Round 1 is steps 1-3; its last
# micro-batch holds one pair, so rank 1 runs a filler pair that counts for nothing. Round 2 trains
# the 16 kept pairs in steps 4-5. A checkpoint every 2 steps: step-2, round-1, step-4, round-2.
RUN = ("loss=ropo", "rounds=2", "rho=0.25", "noise=0.25", "batch_size=4", "grad_accum=2",
       "lr=3e-3", "warmup_ratio=0", "max_length=64", "log_every=1", "save_every=2",
       "device=cpu")  # fmt: skip
LORA = ("lora_rank=4", "lora_alpha=8", "lr=3e-2")


def torchrun(args: list[str], cwd: Path, fault: str = "") -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m ropo train ARGS`; with a `fault`, each process
    runs tests/fault_launcher.py with ROPO_FAULT=`fault` instead of `-m ropo`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPO_FAULT": fault}
    ropo = [str(fault_launcher.LAUNCHER)] if fault else ["-m", "ropo"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", *ropo, "train", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_training(run: Path, reference: Path) -> None:
    logged = read_jsonl(run / "train_log.jsonl")
    expected = read_jsonl(reference / "train_log.jsonl")
    assert [r["step"] for r in logged] == [r["step"] for r in expected] == [1, 2, 3, 4, 5]
    for ours, theirs in zip(logged, expected, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
    kept = lambda path: [(r["round"], r["id"], r["kept"]) for r in read_jsonl(path)]  # noqa: E731
    assert kept(run / "pairs.jsonl") == kept(reference / "pairs.jsonl")  # 2 rounds x 21 lines
    final, expected_final = load_model(run / "final"), load_model(reference / "final")
    for name, value in expected_final.state_dict().items():
        assert torch.allclose(final.state_dict()[name], value, atol=1e-5, rtol=0), name


@pytest.fixture(scope="module")
def inputs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    data = write_synthetic_pairs(tmp_path_factory.mktemp("dist_data") / "pairs.jsonl", 21)
    return [f"model={tiny_model_dir}", f"data={data}", *RUN]


@pytest.fixture(scope="module")
def one_process(inputs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    return train(load_config(None, [*inputs, f"out={out}"]))


@pytest.fixture(scope="module")
def one_process_lora(inputs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_lora") / "run"
    return train(load_config(None, [*inputs, *LORA, f"out={out}"]))


def test_two_processes_train_like_one(inputs: list[str], one_process: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = torchrun([*inputs, f"out={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory estimate per process (2 processes)" in result.stdout
    assert len(read_jsonl(out / "pairs.jsonl")) == 2 * 21  # written once, by rank 0
    assert_same_training(out, one_process)
    assert (out / "cleaned.jsonl").read_text() == (one_process / "cleaned.jsonl").read_text()


def test_two_process_checkpoint_resumes_in_one_process(
    inputs: list[str], one_process: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    killed = torchrun([*inputs, f"out={out}"], cwd=tmp_path, fault="step:5")  # mid round 2
    assert killed.returncode != 0
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000004"
    assert main(["train", f"resume={out}"]) == 0
    assert_same_training(out, one_process)


def test_one_process_lora_checkpoint_resumes_in_two(
    inputs: list[str],
    one_process_lora: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    real_step, calls = train_module.train_step, {"n": 0}

    def crash_on_step_5(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash_on_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, [*inputs, *LORA, f"out={out}"]))
    assert (latest_checkpoint(out) / "lora.safetensors").is_file()  # step-0000004: adapters only
    resumed = torchrun([f"resume={out}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: {out / 'checkpoints' / 'step-0000004'}" in resumed.stdout
    assert_same_training(out, one_process_lora)  # the final model is merged, plain HF
    # The adapters the two processes gathered into round-2 load in one process: resuming the
    # finished run only rewrites final/ from that checkpoint.
    written = (out / "final" / "model.safetensors").read_bytes()
    assert main(["train", f"resume={out}"]) == 0
    assert (out / "final" / "model.safetensors").read_bytes() == written


def test_each_rank_takes_every_other_pair_of_a_micro_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pairs = [TokenizedPair(f"p{i}", (1,), (2,), (3,)) for i in range(5)]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    ids = lambda shares: [([p.id for p in mine], n) for mine, n in shares]  # noqa: E731
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert ids(distributed.rank_share([pairs[:4], pairs[4:]])) == [(["p0", "p2"], 2), (["p4"], 1)]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    # rank 1 has no pair of the last micro-batch: it runs p4 as a filler that counts 0 pairs
    assert ids(distributed.rank_share([pairs[:4], pairs[4:]])) == [(["p1", "p3"], 2), (["p4"], 0)]


def test_rejection_sampling_is_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any joining
    with pytest.raises(ValueError, match="rejection_sampling=true is not supported under torch"):
        distributed.init(load_config(None, ["rejection_sampling=true"]))
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        distributed.init(load_config(None, ["device=cuda:1"]))
