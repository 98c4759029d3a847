"""Test-only fault injection: kill the process at a named point, to prove a run survives it.

Not a stage of the data flow; it imports nothing from ropo, so any stage may call it. With
`ROPO_FAULT=<point>:<n>` in the environment, the n-th time `maybe_crash(point)` runs the process
gets SIGKILL, like an OOM kill or a pulled plug: no exception, no cleanup, no flushed buffers.
Without the variable (every real run) a call costs one environment lookup. tests/test_faults.py
kills runs this way and checks that `resume=` ends where an uninterrupted run does.
"""

from __future__ import annotations

import os
import signal

# Where call sites are; a name outside this list would make a fault test pass without a crash.
POINTS = {
    "step": "step.py, train_step: gradients computed, optimizer not stepped yet",
    "round_end": "train.py, after a round's audit files, before its checkpoint",
    "checkpoint": "checkpoint.py, model and optimizer files written, manifest and rename not yet",
    "rejection_sampling": "filter/rejection.py, inside the sampling loop",
}
_reached: dict[str, int] = {}  # point -> times reached in this process


def maybe_crash(point: str) -> None:
    """SIGKILL this process the n-th time `point` is reached if ROPO_FAULT=<point>:<n>."""
    spec = os.environ.get("ROPO_FAULT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"ROPO_FAULT={spec!r}: expected <point>:<n> with n >= 1 and point one "
            f"of {', '.join(POINTS)}"
        )
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
