"""Ctrl-C and SIGTERM: stop with one line that says where, instead of a traceback.

`handled()` turns SIGINT (Ctrl-C) and SIGTERM (what Slurm, Kubernetes and systemd send before a
kill) into an `Interrupted` exception. The training loop asks for SIGTERM to be *deferred* while
it steps (`deferred_sigterm`): the signal is then only noted, and the loop checks `pending()` at
the next step boundary, writes a checkpoint when that fits in the scheduler's grace period, and
stops. Ctrl-C is never deferred: a person pressing it wants the run to stop now.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(Exception):
    """The run was stopped by a signal; `where` says what it was doing (filled in on the way up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.where = ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_defer = {"active": False, "pending": 0}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGTERM and _defer["active"]:
        _defer["pending"] = signum
        return
    raise Interrupted(signum)


@contextmanager
def handled() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise Interrupted; the old handlers come back after.

    Only the main thread may set handlers: called from another thread it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _defer.update(active=False, pending=0)


@contextmanager
def deferred_sigterm(enabled: bool = True) -> Iterator[None]:
    """Within the block a SIGTERM is only noted (see `pending`); outside it, it raises at once."""
    _defer["active"] = enabled
    try:
        yield
    finally:
        _defer["active"] = False


def pending() -> int:
    """The signal number of a deferred SIGTERM, or 0."""
    return _defer["pending"]
