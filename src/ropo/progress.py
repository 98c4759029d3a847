"""Progress bars that suit where the output goes.

On a terminal: tqdm bars, redrawn in place. Anywhere else (a log file, CI, a Slurm job) tqdm's
carriage-return redraws pile up (a 3-round run of 156 steps wrote 27 KB of them), so there
`progress_bar()` returns `PlainProgress`, which prints one plain line when it starts, at most one
every `PLAIN_EVERY_S` seconds while it runs, and one when it ends.

`RunProgress` is the whole-run line the training loop keeps besides its per-epoch bars:
round r/R, step s/S and an ETA for the training steps left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, TextIO

from tqdm.auto import tqdm

PLAIN_EVERY_S = 30.0


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    initial: int = 0,
) -> tqdm | PlainProgress:
    """A tqdm bar on a terminal, a PlainProgress elsewhere; both iterate, update and close."""
    if is_terminal():
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
            initial=initial,
        )  # fmt: skip
    return PlainProgress(iterable, total, desc, unit, disable, initial)


class PlainProgress:
    """The part of tqdm's interface ropo uses, as a plain line every PLAIN_EVERY_S seconds."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        initial: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else _length(iterable)
        self.n, self.start_n, self.postfix = initial, initial, ""
        self.stream = stream or sys.stderr
        self.start = self.last_print = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_print >= PLAIN_EVERY_S:
            self._print(now)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print(time.monotonic(), done=True)

    def _print(self, now: float, done: bool = False) -> None:
        self.last_print = now
        if self.disable:
            return
        elapsed = self.last_print - self.start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {count} {self.unit}", f"{_clock(elapsed)} elapsed"]
        if rate > 0:
            parts.append(f"{rate:.2f} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts) + (" (done)" if done else ""), file=self.stream, flush=True)


class RunProgress:
    """The whole run in one line: round r/R, step s/S and the ETA of the steps still to go.

    The ETA extrapolates the steps this process has taken (not those of a resumed run's past);
    scoring and sampling between rounds come on top of it.
    """

    def __init__(self, rounds: int, done_steps: int, disable: bool) -> None:
        self.total_steps, self.rounds, self.done = done_steps, rounds, done_steps
        self.first, self.start = done_steps, time.monotonic()
        self.bar = progress_bar(desc="run", unit="step", disable=disable, initial=done_steps)

    def set_total(self, total_steps: int) -> None:
        """The steps of the whole run, as far as they are known (re-planned every round)."""
        self.total_steps = self.bar.total = total_steps

    def step(self, round_number: int) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"round {round_number}/{self.rounds}, ETA {self.eta()}")
        self.bar.update(1)  # after the postfix: a plain line printed here shows the new one

    def eta(self) -> str:
        taken = self.done - self.first
        if taken == 0:
            return "?"
        per_step = (time.monotonic() - self.start) / taken
        return _clock(per_step * max(self.total_steps - self.done, 0))

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
