"""`ropo sft`: the records it reads, the loss it minimises, its run directory and its resume.

The loss is checked against a textbook computation from full logits; accumulation against one
big batch; a run killed mid-step (tests/fault_launcher.py, as in test_faults.py) must resume to
the weights of a run never interrupted; and its final/ must be a model `ropo train` starts from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import fault_launcher
from conftest import read_jsonl, write_synthetic_pairs
from ropo.cli import main
from ropo.config_load import load_config
from ropo.models import Transformer, load_model, load_tokenizer
from ropo.models.chat_format import PLAIN
from ropo.sft import sft, sft_step
from ropo.sft_config import SftConfig
from ropo.sft_data import SftExample, load_demonstrations, tokenize_demonstrations
from ropo.step import StepSettings
from ropo.train import train
from test_config import is_read

SFT = ("batch_size=4", "lr=3e-3", "warmup_ratio=0", "max_length=64", "device=cpu")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def demonstration_records(n: int) -> list[dict]:
    """Prompt/response records whose response repeats the prompt's last word, of varied lengths."""
    words = "apple banana cherry delta echo fox golf hotel india juliet kilo lima".split()
    records = []
    for i in range(n):
        prompt = " ".join(words[j % len(words)] for j in range(i, i + 2 + i % 4))
        records.append({"prompt": f"Question: {prompt} Answer:", "response": f" {words[i % 12]}"})
    return records


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(
        tmp_path_factory.mktemp("sft_data") / "demos.jsonl", demonstration_records(12)
    )


def sft_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={model_dir}", f"data={data}", f"out={out}", *SFT, *extra]


def examples_of(path: Path, model_dir: Path) -> list[SftExample]:
    demonstrations, report = load_demonstrations(path, "plain", PLAIN, strict=False)
    examples, _ = tokenize_demonstrations(
        demonstrations, load_tokenizer(model_dir), 64, report, PLAIN
    )
    return examples


# --- records ---------------------------------------------------------------------------------


def test_every_kind_of_record_becomes_an_example(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Sort 2 1"},
        {"role": "assistant", "content": "1 2"},
    ]
    records = [
        {"prompt": "Question: a Answer:", "response": " b"},
        {"id": "chat-1", "messages": conversation},
        {"prompt": [{"role": "user", "content": "Hi"}], "response": "  "},  # empty_response
        {"prompt": "Question: a Answer:", "response": " b"},  # duplicate_example
    ]
    examples, report = load_demonstrations(
        write_jsonl(tmp_path / "demos.jsonl", records), "plain", PLAIN, strict=False
    )
    assert report.summary() == (
        "read 4 examples, used 2, skipped 2 (duplicate_example: 1, empty_response: 1)"
    )
    assert (examples[0].prompt, examples[0].response) == ("Question: a Answer:", " b")
    assert len(examples[0].id) == 16  # a content hash
    assert examples[1].id == "chat-1" and examples[1].response == "1 2"
    assert examples[1].prompt == (  # every turn before the last answer, in the plain template
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: Sort 2 1\n\nAssistant:"
    )
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl", 3)  # preference records: chosen
    examples, report = load_demonstrations(pairs, "plain", PLAIN, strict=False)
    expected = [(r["id"], r["prompt"], r["chosen"]) for r in read_jsonl(pairs)]
    assert [(e.id, e.prompt, e.response) for e in examples] == expected
    assert report.summary() == "read 3 pairs, used 3, skipped 0"


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "demos.jsonl:2: a preference record"),
        ({"messages": [{"role": "user", "content": "q"}]}, "demos.jsonl:2: field 'messages' must"),
        ({"prompt": "q"}, "demos.jsonl:2: missing field 'response'"),
        ({"id": "x", "prompt": "q", "response": "r"}, "demos.jsonl:2: duplicate id 'x', first"),
    ],
)
def test_a_bad_record_is_named_by_file_and_line(second: dict, message: str, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "demos.jsonl", [{"id": "x", "prompt": "q", "response": "r"}, second]
    )
    with pytest.raises(ValueError, match=message):
        load_demonstrations(path, "plain", PLAIN, strict=False)


# --- the loss --------------------------------------------------------------------------------


def textbook_nll(model: Transformer, examples: list[SftExample]) -> float:
    """Mean negative log-likelihood per response token from the full logits of each example."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([*example.prompt_ids, *example.response_ids])
            logp = model(ids[None])[0].float().log_softmax(-1)  # (T, V)
            first = len(example.prompt_ids)  # the first response token; predicted one earlier
            targets = ids[first:]
            total -= logp[first - 1 : -1].gather(1, targets[:, None]).sum().item()
            count += len(targets)
    return total / count


def test_the_loss_is_the_mean_nll_of_response_tokens_and_accumulation_is_exact(
    tiny_model_dir: Path, demos_file: Path
) -> None:
    examples = examples_of(demos_file, tiny_model_dir)[:5]
    pad_id = load_tokenizer(tiny_model_dir).pad_id
    settings = StepSettings(pad_id, 1.0, torch.device("cpu"), None)
    results = {}
    for name, micro_batches in (
        ("one", [examples]),
        ("three", [examples[:1], examples[1:3], examples[3:]]),
    ):
        model = load_model(tiny_model_dir).train()
        expected = textbook_nll(model, examples)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        stats = sft_step(model, optimizer, micro_batches, 1e-2, settings)
        assert stats.loss == pytest.approx(expected, rel=1e-5), name
        assert stats.tokens == sum(len(e.response_ids) for e in examples) and not stats.skipped
        results[name] = (stats, model.state_dict())
    (one, weights_one), (three, weights_three) = results["one"], results["three"]
    assert three.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    # AdamW's first step moves each weight by lr * g / (|g| + eps): where |g| is near eps, the
    # rounding of three micro-batches against one moves it by up to ~3e-6 (seen on an AVX-512
    # host); a wrong accumulation flips signs and moves weights by ~lr = 1e-2.
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_three[name], value, rtol=1e-5, atol=1e-5)
    assert not torch.equal(weights_one["output.weight"], load_model(tiny_model_dir).output.weight)


# --- runs ------------------------------------------------------------------------------------


def test_a_run_logs_every_step_and_its_final_model_starts_a_train_run(
    tiny_model_dir: Path, demos_file: Path, tmp_path: Path
) -> None:
    out = sft(
        load_config(
            None,
            sft_args(tiny_model_dir, demos_file, tmp_path / "sft", "epochs=2"),
            config=SftConfig,
        )
    )
    log = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7))  # 12 examples in steps of 4, twice
    assert [r["epoch"] for r in log] == [1, 1, 1, 2, 2, 2]
    assert log[-1]["loss"] < log[0]["loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "LATEST",
        "epoch-1",
        "epoch-2",
    ]
    info = json.loads((out / "run.json").read_text())
    assert set(info["inputs"]) == {"model", "tokenizer", "data"} and info["config"]["steps"] == 0
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl", 8)
    args = [f"model={final}", f"data={pairs}", f"out={tmp_path / 'dpo'}", "loss=dpo", "rounds=1",
            "rho=0", "batch_size=8", "max_length=64", "device=cpu"]  # fmt: skip
    run = train(load_config(None, args))
    assert json.loads((run / "run.json").read_text())["inputs"]["model"]["path"] == str(final)


def test_steps_cut_the_last_epoch_short_and_lora_trains_adapters(
    tiny_model_dir: Path, demos_file: Path, tmp_path: Path
) -> None:
    args = sft_args(tiny_model_dir, demos_file, tmp_path / "sft", "steps=4", "lora_rank=2")
    out = sft(load_config(None, args, config=SftConfig))
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 1, 1, 2]
    assert (out / "checkpoints" / "epoch-1" / "lora.safetensors").is_file()
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    merged, base = load_model(out / "final").state_dict(), load_model(tiny_model_dir).state_dict()
    assert not torch.equal(
        merged["layers.0.attention.wq.weight"], base["layers.0.attention.wq.weight"]
    )
    assert torch.equal(merged["output.weight"], base["output.weight"])  # not adapted: frozen


def test_user_errors_are_one_line_with_the_sft_resume_command(
    tiny_model_dir: Path, demos_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sft"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run's")
    assert main(["sft", *sft_args(tiny_model_dir, demos_file, out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ropo: error: {out}: the run directory is not empty (notes.txt)")
    assert f"`ropo sft resume={out}`" in err
    assert main(["sft", *sft_args(tiny_model_dir, demos_file, tmp_path / "x", "noise=0.1")]) == 2
    assert "unknown config key 'noise'; `ropo sft --help` lists them all" in capsys.readouterr().err
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl", 8)
    run = tmp_path / "dpo"
    args = [f"model={tiny_model_dir}", f"data={pairs}", f"out={run}", "rounds=1", "rho=0",
            "batch_size=8", "max_length=64", "device=cpu"]  # fmt: skip
    train(load_config(None, args))
    assert main(["sft", f"resume={run}"]) == 2  # a `ropo train` run is not resumed by sft
    assert "a run of another ropo command" in capsys.readouterr().err


def test_a_missing_model_leaves_no_sft_run_directory(
    demos_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """As for `ropo train` (tests/test_run_dir.py): the inputs are checked before out= is made."""
    nowhere, out = tmp_path / "nonexistent", tmp_path / "made" / "sft"
    assert main(["sft", *sft_args(nowhere, demos_file, out)]) == 2
    assert f"model directory {nowhere} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "made").exists()


def ropo_sft(args: list[str], cwd: Path, fault: str) -> subprocess.CompletedProcess:
    """`ropo sft ARGS` in a fresh process through tests/fault_launcher.py with ROPO_FAULT=`fault`:
    a SIGKILL ends the process, so that run cannot be one of pytest's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPO_FAULT": fault}
    command = fault_launcher.command("sft", *args)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_and_stopped_runs_resume_to_the_uninterrupted_weights(
    tiny_model_dir: Path,
    demos_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    run = ("epochs=2", "save_every=2")  # 6 steps; checkpoints at steps 2, 3 (epoch 1), 4, 6
    whole = tmp_path / "whole"
    assert main(["sft", *sft_args(tiny_model_dir, demos_file, whole, *run)]) == 0
    killed = tmp_path / "killed"  # SIGKILL in step 5: gradients computed, AdamW not stepped
    result = ropo_sft(sft_args(tiny_model_dir, demos_file, killed, *run), tmp_path, "step:5")
    assert result.returncode == -signal.SIGKILL, result.stderr
    stopped = tmp_path / "stopped"  # SIGTERM in step 2: the step finishes, is saved, the run stops
    with monkeypatch.context() as fault:
        fault_launcher.install("step:2:SIGTERM", fault.setattr)
        assert main(["sft", *sft_args(tiny_model_dir, demos_file, stopped, *run)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ropo: interrupted by SIGTERM in epoch 1, after step 2/6; last checkpoint "
        f"{stopped / 'checkpoints' / 'step-0000002'}; continue with `ropo sft resume={stopped}`"
    )
    for out, checkpoint in ((killed, "step-0000004"), (stopped, "step-0000002")):
        assert main(["sft", f"resume={out}"]) == 0
        assert f"resume: {out / 'checkpoints' / checkpoint}" in capsys.readouterr().out
        assert (out / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
        ours = load_model(out / "final").state_dict()
        for name, value in load_model(whole / "final").state_dict().items():
            assert torch.equal(ours[name], value), name


def test_every_sft_key_is_read_somewhere() -> None:
    dead = [key for key, (section, _) in SftConfig.keys().items() if not is_read(key, section)]
    assert dead == [], f"ropo sft keys nothing reads: {dead}"
