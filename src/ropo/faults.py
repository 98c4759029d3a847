"""Test-only fault injection: kill the process at a named point, to prove a run survives it.

Not a stage of the data flow; it imports nothing from ropo, so any stage may call it. With
`ROPO_FAULT=<point>:<n>` in the environment, the n-th time `maybe_crash(point)` runs the process
gets SIGKILL, like an OOM kill or a pulled plug: no exception, no cleanup, no flushed buffers.
`ROPO_FAULT=<point>:<n>:SIGINT` (or SIGTERM, SIGSTOP) sends that signal instead, at exactly that
place, as a Ctrl-C or a scheduler's stop would arrive there.
Without the variable (every real run) a call costs one environment lookup. tests/test_faults.py
kills runs this way and checks that `resume=` ends where an uninterrupted run does.
"""

from __future__ import annotations

import os
import signal

# Where call sites are; a name outside this list would make a fault test pass without a crash.
POINTS = {
    "step": "step.py, apply_step (of train_step, sft_step): gradients there, no AdamW step yet",
    "round_end": "train.py, after a round's audit files, before its checkpoint",
    "checkpoint": "checkpoint.py, model and optimizer files written, manifest and rename not yet",
    "rejection_sampling": "filter/rejection.py, inside the sampling loop",
}
_reached: dict[str, int] = {}  # point -> times reached in this process


# SIGSTOP freezes the process where it stands (holding its run directory's lock) until SIGCONT.
SIGNALS = {
    "SIGKILL": signal.SIGKILL,
    "SIGINT": signal.SIGINT,
    "SIGTERM": signal.SIGTERM,
    "SIGSTOP": signal.SIGSTOP,
}


def maybe_crash(point: str) -> None:
    """Signal this process (SIGKILL by default) the n-th time `point` is reached if
    ROPO_FAULT=<point>:<n>[:<signal>]."""
    spec = os.environ.get("ROPO_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    count, _, signal_name = rest.partition(":")
    signal_name = signal_name or "SIGKILL"
    if name not in POINTS or not count.isdigit() or int(count) < 1 or signal_name not in SIGNALS:
        raise ValueError(
            f"ROPO_FAULT={spec!r}: expected <point>:<n>[:<signal>] with n >= 1, point one "
            f"of {', '.join(POINTS)} and signal one of {', '.join(SIGNALS)}"
        )
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(count):
        os.kill(os.getpid(), SIGNALS[signal_name])
