"""The command line: a bare `ropo train` says what to pass (and points to the built-in task),
and `ropo builtin` checks the built-in task's settings before any of its stages runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ropo
from ropo.cli import main


def test_builtin_settings_are_checked(capsys: pytest.CaptureFixture) -> None:
    # An unknown built-in setting fails before any work, and the message shows which parser ran.
    assert main(["builtin", "no_such_setting=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ropo builtin: error: command line 'no_such_setting=1': unknown key")


@pytest.fixture()
def no_builtin_run(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Stands in for the built-in runs (minutes each) and records what would have run."""
    calls: list[tuple] = []
    monkeypatch.setattr("ropo_builtin.pipeline.run_builtin", lambda *args: calls.append(args))
    monkeypatch.setattr("ropo_builtin.pipeline.run_sweep", lambda *args: calls.append(args))
    return calls


@pytest.mark.parametrize(
    "setting, named",
    [
        ("lr=.nan", "'lr' = nan"),  # YAML's NaN
        ("lr=nan", "'lr' = nan"),  # a string that float() reads as NaN
        ("sft_lr=inf", "'sft_lr' = inf"),
        ("beta=0", ("'beta'", "0.0")),  # ropo train's own check, as for every key it takes
        ("noise=0.5", "'noise' = 0.5"),  # flipping half the labels leaves no signal
        ("rho=1", "'rho' = 1.0"),
        ("alpha=2", ("'alpha'", "2.0")),
        ("demo_error_rate=-0.1", "'demo_error_rate' = -0.1"),
        ("batch_size=0", "'batch_size' = 0"),
        ("max_len=2", "'max_len' = 2"),  # below min_len=3
        ("samples_per_prompt=1", "'samples_per_prompt' = 1"),
        ("dim=30", "'dim' = 30"),  # not a multiple of n_heads=4
        ("methods=dpo,dpo", "'methods' = 'dpo,dpo'"),
        ("device=gpu", "'device' = 'gpu'"),
        ("lr=fast", "'lr' expects float, got 'fast'"),
        ("seed=true", "'seed' expects int, got True"),
        ("sweep=maybe", "'sweep' expects bool, got 'maybe'"),
        ("jobs=0", "'jobs' = 0"),
        ("sweep_seeds=0,x", "'sweep_seeds' expects int values separated by commas, got '0,x'"),
        ("sweep_noises=0,0.5", "'sweep_noises' = 0.5"),
        ("sweep_methods=ropo,ropo_auto", "'sweep_methods' = 'ropo,ropo_auto' must include dpo"),
    ],
)
def test_bad_builtin_settings_fail_before_any_work(
    setting: str,
    named: str | tuple[str, ...],
    no_builtin_run: list[tuple],
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["builtin", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ropo builtin: error: command line '{setting}': ")
    assert all(part in err for part in ((named,) if isinstance(named, str) else named)), err
    assert no_builtin_run == []


def test_good_builtin_settings_reach_the_pipeline(no_builtin_run: list[tuple]) -> None:
    assert main(["builtin", "lr=1e-5", "noise=0", "rho=0", "methods=dpo,ropo", "out=x"]) == 0
    assert len(no_builtin_run) == 1
    (settings,) = no_builtin_run[0]
    assert (settings.lr, settings.noise, settings.methods, settings.out, settings.sweep) == (
        1e-5,
        0.0,
        ("dpo", "ropo"),
        "x",
        False,
    )


def test_builtin_help_lists_the_task_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["builtin", "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: ropo builtin [key=value ...]")
    for key in ("out", "sweep", "noise", "rho", "alpha", "methods", "sweep_seeds"):
        assert f"\n  {key} " in printed, key


def test_train_alone_says_what_to_pass_and_runs_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("ropo_builtin.pipeline.main", lambda words: pytest.fail("the demo ran"))
    assert main(["train"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.startswith("usage: ropo train ")
    for hint in ("model=DIR data=pairs.jsonl", "--config", "resume=", "ropo builtin", "make train"):
        assert hint in printed.err, hint


def test_train_help_says_the_same_and_exits_0(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    assert "model=DIR data=pairs.jsonl" in capsys.readouterr().out


def test_train_with_a_model_uses_the_training_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "model=some/dir", "no_such_key=1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err


def test_keys_lists_every_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["keys"]) == 0
    assert "rejection_sampling" in capsys.readouterr().out


def test_the_library_never_imports_the_builtin_task() -> None:
    # ropo_builtin sits beside the library; only the `builtin` branch of the command line
    # reaches it, through an import inside that function.
    library = Path(ropo.__file__).parent
    found = [
        (str(path.relative_to(library)), line)
        for path in sorted(library.rglob("*.py"))
        for line in path.read_text().splitlines()
        if re.search(r"\bimport\b.*\bropo_builtin\b|\bropo_builtin\b.*\bimport\b", line)
    ]
    lazy = " " * 12 + "from ropo_builtin.pipeline import main as builtin_main"  # in a function
    assert found == [("cli.py", lazy)]
