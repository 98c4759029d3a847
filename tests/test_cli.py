"""The command line routes `ropo train` without a model to the built-in task."""

from __future__ import annotations

import pytest

from ropo.cli import main


def test_builtin_settings_are_checked(capsys: pytest.CaptureFixture) -> None:
    # An unknown built-in setting fails before any work, and the message shows which parser ran.
    assert main(["builtin", "no_such_setting=1"]) == 2
    assert "ropo builtin: error: unknown setting 'no_such_setting'" in capsys.readouterr().err


def test_train_alone_runs_the_builtin_task(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("ropo.task.pipeline.main", lambda words: calls.append(words) or 0)
    assert main(["train"]) == 0
    assert calls == [[]]


def test_train_with_a_model_uses_the_training_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "model=some/dir", "no_such_key=1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err


def test_keys_lists_every_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["keys"]) == 0
    assert "rejection_sampling" in capsys.readouterr().out
