"""The built-in sorting demonstration: gold reward, pair building and audit metrics on hand-made
cases, then the whole pipeline at toy sizes (every stage's files, the report, and stage caching)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ropo_builtin.stages as stages
from ropo.cli import main
from ropo.config_load import load_settings
from ropo.data import load_pairs
from ropo.logps import PairLogps
from ropo_builtin import stage_cache
from ropo_builtin.evaluate import noise_identification, preference_accuracy, win_rate
from ropo_builtin.pairs import build_pairs
from ropo_builtin.pipeline import run_builtin, run_sweep
from ropo_builtin.settings import COMMAND, TaskSettings
from ropo_builtin.sorting import correct_response, gold_reward, make_task
from ropo_builtin.stage_cache import run_stage
from ropo_builtin.stages import run_dir_for


def test_gold_reward_counts_right_positions_over_the_longer_list() -> None:
    prompt = "sort 3 1 2"  # answer: 1 2 3
    assert gold_reward(prompt, "1 2 3") == 1.0
    assert gold_reward(prompt, "3 2 1") == pytest.approx(1 / 3)  # only the middle 2 is in place
    assert gold_reward(prompt, "1 2") == pytest.approx(2 / 3)  # a missing number costs its slot
    assert gold_reward(prompt, "1 2 3 3") == pytest.approx(3 / 4)  # an extra one too
    assert gold_reward(prompt, "1 x 3") == pytest.approx(2 / 3)  # a non-number never matches
    assert gold_reward(prompt, "") == 0.0
    with pytest.raises(ValueError, match="not a sorting prompt"):
        gold_reward("reverse 1 2", "2 1")


def test_task_is_seeded_with_disjoint_splits_and_the_asked_error_rate() -> None:
    task = make_task(400, 50, 30, seed=3, demo_error_rate=0.25)
    assert task == make_task(400, 50, 30, seed=3, demo_error_rate=0.25)
    splits = [set(task.sft_prompts), set(task.train_prompts), set(task.heldout_prompts)]
    assert sum(map(len, splits)) == len(set.union(*splits)) == 480
    demos = zip(task.sft_prompts, task.demonstrations, strict=True)
    wrong = sum(d != correct_response(p) for p, d in demos)
    assert wrong == task.demo_errors and 0.15 < wrong / 400 < 0.35
    assert all(3 <= len(p.split()) - 1 <= 7 for p in task.train_prompts)


def test_pairs_take_the_best_sample_and_a_strictly_worse_one() -> None:
    prompts = ["sort 2 1", "sort 3 1", "sort 5 4"]
    responses = [["1 2", "2 1", "1 2", " "], ["1 3", "1 3", "1 3", "1 3"], ["4", "", "9 9", "4 5"]]
    pairs, stats = build_pairs(prompts, responses, "train", seed=0)
    assert [p.id for p in pairs] == ["train-00000", "train-00002"]  # prompt 1: all tied
    assert (pairs[0].chosen, pairs[0].rejected) == ("1 2", "2 1")  # the blank sample is left out
    assert pairs[1].chosen == "4 5" and pairs[1].rejected in ("4", "9 9")
    assert stats.pairs == 2 and stats.skipped_ties == 1 and stats.mean_chosen_reward == 1.0


def test_win_rate_counts_ties_as_half() -> None:
    policy = [[1.0, 0.5], [0.2, 0.2]]
    baseline = [[0.5, 0.5], [0.3, 0.1]]
    assert win_rate(policy, baseline) == (1 + 0.5 + 0 + 1) / 4


def test_preference_accuracy_is_the_share_of_positive_implicit_margins() -> None:
    ones = torch.ones(4)
    policy = PairLogps(
        torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.tensor([-2.0, -1.0, -3.0, -1.0]), ones, ones
    )
    reference = PairLogps(
        torch.tensor([-1.5, -2.0, -3.0, -1.0]), torch.tensor([-1.5, -2.0, -3.0, -1.0]), ones, ones
    )
    # margins: (0.5) - (-0.5) = 1 > 0; 0 - 1 = -1; 0 - 0 = 0 (a tie is wrong); 0 - 0 = 0
    assert preference_accuracy(policy, reference) == 0.25


def test_noise_identification_on_a_hand_made_audit() -> None:
    def record(pair_id: str, round_idx: int, loss: float, kept: bool, flipped: bool) -> dict:
        return {
            "id": pair_id,
            "round": round_idx,
            "loss": loss,
            "margin": -loss,
            "kept": kept,
            "flipped": flipped,
        }

    audit = [  # 5 pairs, b and d flipped; round 0 drops c and d, round 1 drops b and d
        record("a", 0, 0.1, True, False),
        record("b", 0, 0.5, True, True),
        record("c", 0, 0.9, False, False),
        record("d", 0, 0.8, False, True),
        record("e", 0, 0.2, True, False),
        record("a", 1, 0.1, True, False),
        record("b", 1, 0.9, False, True),
        record("c", 1, 0.3, True, False),
        record("d", 1, 0.8, False, True),
        record("e", 1, 0.2, True, False),
    ]
    first, second = noise_identification(audit)
    assert (first["n_dropped"], first["n_flipped"]) == (2, 2)
    assert first["drop_precision"] == 0.5 and first["drop_recall"] == 0.5
    # loss AUROC: flipped losses {0.5, 0.8} against clean {0.1, 0.9, 0.2}: 2 + 2 wins of 6 pairs
    assert first["loss_auroc"] == pytest.approx(4 / 6)
    assert first["margin_flipped"] == pytest.approx(-0.65)
    assert second["drop_precision"] == 1.0 and second["drop_recall"] == 1.0
    assert second["loss_auroc"] == 1.0


def test_a_stage_runs_once_and_again_when_its_inputs_or_outputs_change(tmp_path: Path) -> None:
    calls = []
    output = tmp_path / "made.txt"

    def work() -> dict:
        calls.append(1)
        output.write_text("x")
        return {"n": len(calls)}

    assert not run_stage(tmp_path, "demo", {"a": 1}, [output], work).cached
    again = run_stage(tmp_path, "demo", {"a": 1}, [output], work)
    assert again.cached and again.result == {"n": 1} and len(calls) == 1
    assert not run_stage(tmp_path, "demo", {"a": 2}, [output], work).cached
    output.unlink()
    assert not run_stage(tmp_path, "demo", {"a": 2}, [output], work).cached
    assert len(calls) == 3


def test_a_stage_computed_by_other_code_is_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, calls = tmp_path / "out.txt", []

    def work() -> dict:
        calls.append(1)
        output.write_text("x")
        return {}

    run_stage(tmp_path, "demo", {"a": 1}, [output], work)
    assert run_stage(tmp_path, "demo", {"a": 1}, [output], work).cached
    monkeypatch.setattr(stage_cache, "source_fingerprint", lambda: "another build")
    assert not run_stage(tmp_path, "demo", {"a": 1}, [output], work).cached
    assert len(calls) == 2


def test_the_source_in_a_stage_key_is_the_library_and_the_task(tmp_path: Path) -> None:
    assert [p.__name__ for p in stage_cache.SOURCE_PACKAGES] == ["ropo", "ropo_builtin"]
    packages = []
    for name in ("library", "task"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("x = 1\n")
        packages.append(SimpleNamespace(__name__=name, __file__=tmp_path / name / "__init__.py"))
    before = stage_cache.fingerprint_of(tuple(packages))
    (tmp_path / "task" / "__init__.py").write_text("x = 2\n")  # an edit of the task alone
    assert stage_cache.fingerprint_of(tuple(packages)) != before


def test_settings_from_key_value_words() -> None:
    words = ["out=x/y", "noise=0.2", "methods=dpo,ropo", "dim=48", "sweep=true"]
    settings = load_settings(TaskSettings, words, COMMAND)
    assert (settings.noise, settings.methods, settings.dim) == (0.2, ("dpo", "ropo"), 48)
    assert settings.out == "x/y" and settings.sweep
    with pytest.raises(ValueError, match="unknown key 'noice'"):
        load_settings(TaskSettings, ["noice=0.2"], COMMAND)
    with pytest.raises(ValueError, match="methods"):
        TaskSettings(methods=("dpo", "ppo"))


TOY = TaskSettings(
    n_sft=600,
    n_train_prompts=48,
    n_heldout_prompts=16,
    max_len=5,
    dim=32,
    n_layers=1,
    sft_steps=120,
    sft_batch_size=32,
    sft_lr=1e-2,
    max_new_tokens=14,
    batch_size=8,
    lr=1e-3,
    rounds=2,
    rho=0.25,
    rs_k=2,
    eval_samples=1,
    methods=("dpo_clean", "dpo", "ropo", "ropo_rs"),
    jobs=1,  # in this process: the tests below count its calls to `train`
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("builtin")
    return out, run_builtin(replace(TOY, out=str(out)))


def test_every_stage_leaves_its_files(toy_run: tuple[Path, dict]) -> None:
    out, results = toy_run
    for name in (
        "task/task.json",
        "task/tokenizer.model",
        "sft_init/model.safetensors",
        "sft_data.jsonl",
        "sft/run.json",
        "sft/metrics.jsonl",
        "sft/final/config.json",
        "sft/final/model.safetensors",
        "sft/final/tokenizer.model",
        "results.json",
        "report.md",
        "summary.png",
        "filtering.png",
        "margins.png",
        "training.png",
    ):
        assert (out / name).is_file(), name
    train_pairs, _ = load_pairs(out / "pairs_train.jsonl")
    heldout_pairs, _ = load_pairs(out / "pairs_heldout.jsonl")
    assert len(train_pairs) >= 16 and heldout_pairs
    assert all(
        gold_reward(p.prompt, p.chosen) > gold_reward(p.prompt, p.rejected)
        for p in train_pairs + heldout_pairs
    )
    for method in TOY.methods:
        run_dir = run_dir_for(out, method, 0.0 if method == "dpo_clean" else TOY.noise, TOY.seed)
        for name in (
            "metrics.jsonl",
            "pairs.jsonl",
            "train_log.jsonl",
            "final/config.json",
            "final/tokenizer.model",
        ):
            assert (run_dir / name).is_file(), f"{method}/{name}"
    flips = json.loads((run_dir_for(out, "ropo", 0.4, 0) / "flips.json").read_text())
    assert 0 < sum(flips.values()) < len(flips) == len(train_pairs)
    assert not (out / "runs" / "noise0-seed0" / "dpo" / "flips.json").exists()  # nothing flipped
    rows = {run["method"]: run for run in results["runs"]}
    assert set(rows) == set(TOY.methods) and rows["dpo_clean"]["noise"] == 0.0
    assert len(rows["ropo"]["rounds"]) == TOY.rounds and len(rows["dpo"]["rounds"]) == 1
    for run in results["runs"]:
        scores = run["scores"]
        assert 0 <= scores["gold_reward"] <= 1 and 0 <= scores["win_rate"] <= 1
        assert len(run["prompt_rewards"]) == TOY.n_heldout_prompts  # for the paired statistics
        assert sum(run["prompt_rewards"]) / TOY.n_heldout_prompts == pytest.approx(
            scores["gold_reward"]
        )
    report = (out / "report.md").read_text()
    assert "ROPO + RS" in report and "![filtering](filtering.png)" in report


def test_a_rerun_skips_every_stage_and_a_change_reruns_only_what_depends_on_it(
    toy_run: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, first = toy_run
    trained = []
    real_train = stages.train

    def counting_train(cfg):  # noqa: ANN001, ANN202
        trained.append(Path(cfg.run.out).name)
        return real_train(cfg)

    def no_sft(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("SFT must not rerun")

    monkeypatch.setattr(stages, "train", counting_train)
    monkeypatch.setattr(stages, "train_sft", no_sft)
    again = run_builtin(replace(TOY, out=str(out)))
    assert trained == [] and again["runs"] == first["runs"]
    run_builtin(replace(TOY, out=str(out), rho=0.5, methods=("dpo", "ropo")))
    assert trained == ["ropo"]  # DPO does not read rho


def test_sweep_reuses_the_first_stages(
    toy_run: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = toy_run
    monkeypatch.setattr(stages, "train_sft", lambda *a, **k: pytest.fail("SFT reran"))
    settings = replace(
        TOY, sweep_noises=(0.0, 0.25), sweep_seeds=(0,), sweep_methods=("dpo", "ropo", "cdpo")
    )
    sweep = run_sweep(replace(settings, out=str(out)))
    assert sweep["skipped"] == [{"method": "cdpo", "noise": 0.0, "reason": "ε = 0: plain DPO"}]
    assert len(sweep["runs"]) == 5 and sweep["runs"][-1]["method"] == "cdpo"
    sweep["runs"].pop()
    assert {(r["method"], r["noise"]) for r in sweep["runs"]} == {
        ("dpo", 0.0),
        ("ropo", 0.0),
        ("dpo", 0.25),
        ("ropo", 0.25),
    }
    assert (out / "sweep.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Noise sweep" in report and "(ε = 0: plain DPO)" in report
    assert math.isfinite(sweep["runs"][0]["scores"]["gold_reward"])


def test_interrupted_builtin_keeps_finished_stages_and_says_how_to_go_on(
    toy_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out = Path(shutil.copytree(toy_run[0], tmp_path / "builtin"))
    command = _builtin(out, replace(TOY, lr=2e-3, methods=("dpo",)))  # a new lr: stage 5 reruns
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROPO_FAULT": "step:2:SIGINT"}
    launcher = Path(__file__).with_name("fault_launcher.py")  # injects ROPO_FAULT's SIGINT
    command = [sys.executable, str(launcher), *command[3:]]  # [3:]: "builtin" and its keys
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "ropo builtin: interrupted by SIGINT in stage [train/runs/noise0.4-seed0/dpo], in round "
        "1/1, epoch 1, after "
        f"global step 1; the finished stages are kept in {out} and skipped next time: run the "
        "same command again to continue"
    )
    for stage in ("task", "sft", "pairs"):
        assert f"[{stage}] up to date, skipped" in result.stdout
        assert (out / "stages" / f"{stage}.json").is_file()


def _copy_without_runs(toy_run: tuple[Path, dict], where: Path) -> Path:
    """A copy of the toy pipeline's directory with stages 1-3 done and no preference run."""
    out = Path(shutil.copytree(toy_run[0], where))
    for done in (out / "runs", out / "stages" / "train", out / "stages" / "eval" / "runs"):
        shutil.rmtree(done, ignore_errors=True)
    return out


def _builtin(out: Path, settings: TaskSettings) -> list[str]:
    """`python -m ropo builtin` with every one of `settings` spelt out, into `out`."""
    words = [
        f"{key}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
        for key, value in asdict(replace(settings, out=str(out))).items()
    ]
    return [sys.executable, "-m", "ropo", "builtin", *words]


def test_runs_in_worker_processes_give_the_rows_of_runs_in_this_process(
    toy_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = _copy_without_runs(toy_run, tmp_path / "parallel")
    threads = torch.get_num_threads()
    methods = ("ropo_rs", "dpo", "ropo")  # ROPO + RS trains longest: it finishes last
    try:  # 2 threads for 2 jobs: each worker gets 1, as the in-process runs of toy_run had
        parallel = run_builtin(replace(TOY, out=str(out), jobs=2, threads=2, methods=methods))
    finally:
        torch.set_num_threads(threads)
    in_process = {row["method"]: row for row in toy_run[1]["runs"]}
    for row in parallel["runs"]:  # the same numbers, in the order of `methods`
        row["train_seconds"] = in_process[row["method"]]["train_seconds"]
    assert parallel["runs"] == [in_process[method] for method in methods]
    printed = capsys.readouterr().out
    for run in ("noise0.4-seed0/dpo", "noise0.4-seed0/ropo", "noise0.4-seed0/ropo_rs"):
        log = out / "logs" / (run.replace("/", "-") + ".log")
        assert f"[train/runs/{run}] training in a worker process, output in {log}" in printed
        assert f"[train/runs/{run}] trained in " in printed
        assert "run finished" in log.read_text()  # the run's own summary went to its log


def test_a_run_that_fails_in_a_worker_is_one_line_naming_the_run_and_its_log(
    toy_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = _copy_without_runs(toy_run, tmp_path / "broken")
    (out / "pairs_train.jsonl").write_text("{not json\n")  # stage 3's file, damaged after it ran
    # In this process, so that stages 1-3 stay cached (a subprocess would rerun them, and
    # rewrite the file, if someone edits ropo's source meanwhile); the run fails in a worker.
    assert main(_builtin(out, replace(TOY, methods=("dpo",), jobs=2))[3:]) == 2
    err = capsys.readouterr().err
    log = out / "logs" / "noise0.4-seed0-dpo.log"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"ropo builtin: error: run train/runs/noise0.4-seed0/dpo failed (its output: {log}): "
        f"{out / 'pairs_train.jsonl'}:1: "
    )
    assert "Traceback" in log.read_text()  # the worker's traceback, for whoever needs it


def test_ctrl_c_stops_the_workers_too_and_says_which_runs_it_stopped(
    toy_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out = _copy_without_runs(toy_run, tmp_path / "stopped")
    settings = replace(TOY, methods=("dpo", "ropo"), jobs=2, epochs_per_round=500)  # minutes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        _builtin(out, settings), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,  # its own process group, as a terminal gives it
    )  # fmt: skip
    watchdog = threading.Timer(120, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        logs = [out / "logs" / f"noise0.4-seed0-{method}.log" for method in settings.methods]
        while not all(log.is_file() and "memory estimate" in log.read_text() for log in logs):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.2)  # until both workers train
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole group gets SIGINT
        _, stderr = process.communicate(timeout=60)
    finally:
        watchdog.cancel()
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == (
        "ropo builtin: interrupted by SIGINT while train/runs/noise0.4-seed0/dpo, "
        "train/runs/noise0.4-seed0/ropo trained in worker processes (stopped); the finished "
        f"stages are kept in {out} and skipped next time: run the same command again to continue"
    )
    for _ in range(50):  # no worker is left running (multiprocessing's helper may take a moment)
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the stopped command is still running")
    assert not (out / "stages" / "train").exists()  # neither run counts as done
    assert (out / "stages" / "pairs.json").is_file()
