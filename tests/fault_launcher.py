"""Test-only: the `ropo` command line with a fault injected at a named point of a run.

    ROPO_FAULT=<point>:<n>[:<signal>] python tests/fault_launcher.py train key=value ...

The n-th time the run reaches <point>, the process gets SIGKILL, like an OOM kill or a pulled
plug: no exception, no clean-up, no flushed buffers. A signal name (SIGINT, SIGTERM, SIGSTOP)
sends that signal instead, at exactly that place, as a Ctrl-C, a scheduler's stop or a freeze
would arrive there. The library knows nothing of this: before handing over to `ropo.cli.main`,
the launcher wraps the library function that sits at the point, where its caller looks it up.
An in-process test does the same for one test with `install(spec, monkeypatch.setattr)`.
tests/test_faults.py kills runs this way and checks that `resume=` ends where an uninterrupted
run does.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _every_call(*args: Any, **kwargs: Any) -> bool:
    return True


@dataclass(frozen=True)
class Point:
    """A place in a run: just before (or `after`) each call of the functions `targets` names
    (module, attribute) for which `counts(*args)` holds."""

    where: str
    targets: tuple[tuple[str, str], ...]
    after: bool = False
    counts: Callable[..., bool] = _every_call


POINTS = {
    "step": Point(
        "step.apply_step (train_step, sft_step): gradients there, no AdamW update yet",
        (("ropo.step", "apply_step"), ("ropo.sft", "apply_step")),
    ),
    "checkpoint": Point(
        "checkpoint.py: model, optimizer and state files written, manifest and rename not yet",
        (("ropo.checkpoint", "write_manifest"),),
    ),
    "round_end": Point(
        "train.py: a round's audit files and sampled pairs written, its checkpoint not yet",
        (("ropo.train", "save"),),
        counts=lambda run, name, *rest: name.startswith("round-"),
    ),
    "rejection_sampling": Point(
        "filter/rejection.py: a batch of prompts sampled, not yet scored",
        (("ropo.filter.rejection", "sample_responses"),),
        after=True,
    ),
}
# SIGSTOP freezes the process where it stands (holding its run directory's lock) until SIGCONT.
SIGNALS = {name: getattr(signal, name) for name in ("SIGKILL", "SIGINT", "SIGTERM", "SIGSTOP")}
LAUNCHER = Path(__file__).resolve()


@dataclass(frozen=True)
class Fault:
    point: str
    count: int  # the n-th time the point is reached, from 1
    signal: signal.Signals


def parse_fault(spec: str) -> Fault:
    """The fault `spec` (<point>:<n>[:<signal>]) names; a typo raises ValueError rather than
    never firing, which would let a fault test pass without its fault."""
    name, _, rest = spec.partition(":")
    count, _, signal_name = rest.partition(":")
    signal_name = signal_name or "SIGKILL"
    if name not in POINTS or not count.isdigit() or int(count) < 1 or signal_name not in SIGNALS:
        raise ValueError(
            f"ROPO_FAULT={spec!r}: expected <point>:<n>[:<signal>] with n >= 1, point one "
            f"of {', '.join(POINTS)} and signal one of {', '.join(SIGNALS)}"
        )
    return Fault(name, int(count), SIGNALS[signal_name])


def install(spec: str, patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Wrap the functions at the point `spec` names, so that the process signals itself the n-th
    time the run reaches it: for the process's life with setattr, for one test with
    monkeypatch.setattr. A target the library no longer has raises AttributeError."""
    fault = parse_fault(spec)
    point = POINTS[fault.point]
    reached = [0]  # one count for the point, whichever of its targets the run calls

    def signal_if_due() -> None:
        reached[0] += 1
        if reached[0] == fault.count:
            os.kill(os.getpid(), fault.signal)

    # Every module first: one imported after a patch would take the patched function as its own.
    modules = [importlib.import_module(name) for name, _ in point.targets]
    for module, (_, attribute) in zip(modules, point.targets, strict=True):
        patch(module, attribute, _wrapped(getattr(module, attribute), point, signal_if_due))


def _wrapped(original: Callable, point: Point, signal_if_due: Callable[[], None]) -> Callable:
    """`original`, with signal_if_due called before (or after) each call that counts."""

    @functools.wraps(original)
    def faulty(*args: Any, **kwargs: Any) -> Any:
        due = point.counts(*args, **kwargs)
        if due and not point.after:
            signal_if_due()
        result = original(*args, **kwargs)
        if due and point.after:
            signal_if_due()
        return result

    return faulty


def command(*args: str) -> list[str]:
    """The command line that runs `ropo ARGS` through this launcher (ROPO_FAULT in its env)."""
    return [sys.executable, str(LAUNCHER), *args]


def main() -> int:
    spec = os.environ.get("ROPO_FAULT", "")
    if spec:
        install(spec)
    from ropo.cli import main as ropo_main

    return ropo_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
