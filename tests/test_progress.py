"""What a person sees of a run: plain progress lines in a log, and the summary at the end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import ropo.progress as progress
from test_faults import ropo_train


def test_plain_progress_prints_a_line_every_interval_and_one_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([0.0, 10.0, 31.0, 40.0, 50.0, 80.0])  # start, then one per update and close
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = progress.PlainProgress(total=4, desc="round 1/2 epoch 1/1", unit="step", stream=stream)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix_str("loss=0.5")
    bar.close()
    bar.close()  # a second close prints nothing more
    lines = stream.getvalue().splitlines()
    assert lines == [  # at 10, 40 and 50 s the last line is under 30 s old: no line
        "round 1/2 epoch 1/1: 2/4 step, 0:00:31 elapsed, 0.06 step/s, loss=0.5",
        "round 1/2 epoch 1/1: 4/4 step, 0:01:20 elapsed, 0.05 step/s, loss=0.5 (done)",
    ]
    assert "\r" not in stream.getvalue()


def test_run_progress_eta_extrapolates_this_process_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"t": 100.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: now["t"])
    run = progress.RunProgress(rounds=2, done_steps=4, disable=True)  # a resumed run
    run.set_total(10)
    assert run.eta() == "?"
    now["t"] += 6.0
    run.step(round_number=2)
    run.step(round_number=2)  # 2 steps in 6 s, 4 to go
    assert run.eta() == "0:00:12"


def test_a_logged_run_writes_plain_lines_and_ends_with_a_summary(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [f"model={tiny_model_dir}", f"data={tiny_pairs_file}", f"out={out}", "loss=ropo",
            "rounds=3", "rho=0.25", "noise=0.25", "batch_size=4", "max_length=64",
            "device=cpu", "eval_split=0.1"]  # fmt: skip
    result = ropo_train(args, cwd=tmp_path)  # stdout and stderr are pipes, as in a batch job
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr  # no carriage-return redraws in a log
    assert len(result.stderr) < 3000, result.stderr  # 3 short rounds: a few lines
    # The whole-run line: 11 steps in round 1 (43 pairs), then 8 on the kept 32 in rounds 2, 3.
    assert "run: 27/27 step" in result.stderr
    lines = result.stdout.splitlines()
    summary = lines[next(i for i, line in enumerate(lines) if line.startswith("run finished")) :]
    assert summary[0].startswith("run finished: 0:00:")
    assert summary[1].startswith(f"pairs: {tiny_pairs_file}: read 48 pairs, used 43")
    assert summary.pop(2).startswith("held-out pairs (eval_split=0.1): read 5 pairs, used 5")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3]  # rounds count from 1 in every file
    for line, m in zip(summary[2:5], metrics, strict=True):
        assert line.startswith(
            f"round {m['round']}: kept {m['n_kept']}, dropped {m['n_dropped']} of {m['n_pairs']}; "
            f"train accuracy {m['reward_accuracy']:.3f}; eval accuracy {m['eval_accuracy']:.3f}; "
            f"dropped flips: precision {m['drop_precision']:.3f}"
        )
    assert summary[5] == (
        f"final: train accuracy {metrics[-1]['reward_accuracy']:.3f}, "
        f"eval accuracy {metrics[-1]['eval_accuracy']:.3f}"
    )
    assert summary[6].startswith(f"written: {out / 'final'}, {out / 'run.json'}, ")
    assert len(summary) == 7
