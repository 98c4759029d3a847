"""The worker-process side of parallel preference runs (runs.py starts the workers): each worker
trains one run at a time with its share of the CPU threads, its output in the run's log file.

Two processes with one thread each get more done than one process with two, because a tiny
model's kernels leave a second thread idle much of the time. Measured on a 2-core machine: two
1-thread runs side by side took 27.8 s where one 2-thread run took 23.2 s (1.66 times the
throughput); at the task's model size with 2,000 prompts, 32-33 s against 22 s (1.36 times).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import torch

from ropo_builtin.stages import TrainJob, run_training


def worker_threads(threads: int, jobs: int) -> int:
    """Torch threads per worker: the CPU threads (`threads`, 0 = every core) shared by `jobs`."""
    return max(1, (threads or os.cpu_count() or 1) // jobs)


class WorkerStopped(Exception):
    """Raised in a worker by the SIGTERM with which the main process stops it (runs.py)."""


def start_worker(threads: int) -> None:
    """Initializer of each worker process: `threads` threads for torch and OpenMP; Ctrl-C
    ignored and SIGTERM raised as WorkerStopped. The main process stops its workers itself
    with SIGTERM: a Ctrl-C on the terminal would reach every process of its group at once. As
    an exception the signal ends the run like any error (the run directory's lock released, the
    process's own clean-up done), where a plain SIGTERM would kill the process on the spot."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything this process starts
    torch.set_num_threads(threads)  # sets OpenMP's count too: torch is already loaded here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stopped)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise WorkerStopped(f"stopped by {signal.Signals(signum).name} from the main process")


def train_in_worker(job: TrainJob, log: Path) -> tuple[dict[str, Any], float]:
    """Stage 5's work for `job`, its stdout and stderr (tqdm bars, summary, a traceback) written
    to `log`; returns the stage result and the seconds it took."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as file:
        _redirect_output(file)
        start = time.perf_counter()
        try:
            result = run_training(job)
        except BaseException:
            traceback.print_exc()  # the main process shows one line that names this log
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return result, time.perf_counter() - start


def _redirect_output(file: TextIO) -> None:
    """Send this process's stdout and stderr, Python's and C's alike, to `file`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(file.fileno(), sys.stdout.fileno())
    os.dup2(file.fileno(), sys.stderr.fileno())
