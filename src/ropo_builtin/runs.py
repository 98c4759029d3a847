"""The preference runs of a demo or a sweep: stage 5 (train) and stage 6 (evaluate) for each
planned run, in this process (jobs=1) or with training in `jobs` worker processes (workers.py).

Training is what takes the time, so it is what runs in parallel. Evaluation stays here: the
Judge holds the SFT model and its samples, built once, and is not sent to other processes. The
rows come back in plan order whatever order the runs finish in, and every finished stage is
cached (stage_cache.py), so an interrupted demo or sweep continues where it stopped.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ropo.interrupt import Interrupted
from ropo_builtin import evaluate
from ropo_builtin.settings import METHOD_LABELS, TaskSettings
from ropo_builtin.stage_cache import StageResult, cached_stage, forget_stage, record_stage
from ropo_builtin.stages import TrainJob, run_dir_for, stage_eval, stage_train, train_job
from ropo_builtin.workers import start_worker, train_in_worker, worker_threads


@dataclass(frozen=True)
class PlannedRun:
    """One preference run: a method (settings.METHOD_LABELS) at a flip rate, with a run seed."""

    method: str
    noise: float
    seed: int


@dataclass
class Prepared:
    """Stages 1-3 and the SFT model's evaluation, shared by every run of a demo or a sweep."""

    pairs: StageResult
    sft_eval: StageResult
    judge: Callable[[], evaluate.Judge]


def run_plan(
    s: TaskSettings, out: Path, prepared: Prepared, plan: list[PlannedRun]
) -> list[dict[str, Any]]:
    """Train and evaluate every run of `plan`; one results row per run, in plan order."""
    if s.jobs == 1:
        rows = []
        for run in plan:
            trained = stage_train(s, out, run.method, run.noise, run.seed, prepared.pairs)
            rows.append(evaluate_run(s, out, prepared, run, trained))
        return rows
    return _run_with_workers(s, out, prepared, plan)


def evaluate_run(
    s: TaskSettings, out: Path, prepared: Prepared, run: PlannedRun, trained: StageResult
) -> dict[str, Any]:
    """Stage 6 for a trained run: its results row."""
    run_dir = run_dir_for(out, run.method, run.noise, run.seed)
    name = str(run_dir.relative_to(out))
    upstream = [trained.key, prepared.sft_eval.key]
    scored = stage_eval(s, out, name, run_dir / "final", upstream, prepared.judge)
    return {
        "method": run.method,
        "label": METHOD_LABELS[run.method],
        "noise": run.noise,
        "seed": run.seed,
        "run_dir": name,
        "train_seconds": trained.seconds,
        **scored.result,
    }


def _run_with_workers(
    s: TaskSettings, out: Path, prepared: Prepared, plan: list[PlannedRun]
) -> list[dict[str, Any]]:
    """run_plan with training in worker processes, at most `s.jobs` at once; each run is
    evaluated here as soon as it is trained, while the workers go on with the next ones."""
    jobs = {}  # stage name -> job; a demo at noise 0 plans dpo_clean and dpo: one run
    for run in plan:
        job = train_job(s, out, run.method, run.noise, run.seed, prepared.pairs)
        jobs.setdefault(job.name, job)
    trained = {name: cached_stage(out, name, j.inputs, j.outputs) for name, j in jobs.items()}
    to_train = deque(jobs[name] for name, done in trained.items() if done is None)
    rows: dict[int, dict[str, Any]] = {}

    def evaluate_job(name: str) -> None:
        for index, run in enumerate(plan):
            if run_dir_for(out, run.method, run.noise, run.seed) == jobs[name].run_dir:
                rows[index] = evaluate_run(s, out, prepared, run, trained[name])

    cached = [name for name, done in trained.items() if done is not None]
    if not to_train:  # nothing to train: no worker is started
        for name in cached:
            evaluate_job(name)
        return [rows[index] for index in range(len(plan))]
    # A run's threads depend on `jobs` alone, not on how many runs were cached, so that its
    # numbers do not change with what an earlier command finished.
    threads = worker_threads(s.threads, s.jobs)
    workers = WorkerPool(out, min(s.jobs, len(to_train)), threads)
    with workers.stopping_on_error(), torch_threads(threads):
        while to_train and workers.has_room():
            workers.start(to_train.popleft())
        for name in cached:
            evaluate_job(name)  # while the workers train
        while workers.running:
            job, trained[job.name] = workers.next_finished()
            if to_train:
                workers.start(to_train.popleft())
            evaluate_job(job.name)
    return [rows[index] for index in range(len(plan))]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """`threads` torch threads in this process within the block. While the workers train, an
    evaluation here takes a worker's share of the cores, not all of them: with more threads
    than cores, evaluations took 3-6 times and runs 2 times as long (measured on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def log_file(out: Path, job: TrainJob) -> Path:
    """<out>/logs/<run>.log, e.g. logs/noise0.4-seed1-ropo.log for runs/noise0.4-seed1/ropo."""
    return out / "logs" / ("-".join(job.run_dir.relative_to(out / "runs").parts) + ".log")


class WorkerPool:
    """Worker processes that train one run each at a time; the main process keeps the stage
    markers and prints one line when a run starts and one when it ends."""

    def __init__(self, out: Path, jobs: int, threads: int) -> None:
        self.out, self.jobs = out, jobs
        self.running: dict[Future, TrainJob] = {}
        self._children_before = set(multiprocessing.active_children())
        self.pool = ProcessPoolExecutor(
            max_workers=jobs,
            # spawn: a forked child of a process whose torch threads already ran can hang
            mp_context=multiprocessing.get_context("spawn"),
            initializer=start_worker,
            initargs=(threads,),
        )

    def has_room(self) -> bool:
        return len(self.running) < self.jobs

    def start(self, job: TrainJob) -> None:
        forget_stage(self.out, job.name)
        log = log_file(self.out, job)
        self.running[self.pool.submit(train_in_worker, job, log)] = job
        print(f"[{job.name}] training in a worker process, output in {log}", flush=True)

    def next_finished(self) -> tuple[TrainJob, StageResult]:
        """Wait for a run to finish; record its stage. A failed run raises, naming its log."""
        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        job = self.running.pop(future)
        log = log_file(self.out, job)
        try:
            result, seconds = future.result()
        except (ValueError, FileNotFoundError) as err:  # a user's error: one line, exit 2
            kind = ValueError if isinstance(err, ValueError) else FileNotFoundError
            raise kind(f"run {job.name} failed (its output: {log}): {err}") from None
        except BrokenProcessPool as err:
            raise RuntimeError(
                f"run {job.name}: its worker process died (killed? out of memory?); its "
                f"output: {log}"
            ) from err
        except Exception as err:
            raise RuntimeError(f"run {job.name} failed: {err!r}; traceback in {log}") from err
        print(f"[{job.name}] trained in {seconds:.0f} s ({log})", flush=True)
        return job, record_stage(self.out, job.name, job.inputs, result, seconds)

    @contextmanager
    def stopping_on_error(self) -> Iterator[None]:
        """On any exception in the block (Ctrl-C included) the workers stop at once and no
        other run starts; on leaving it, the pool shuts down."""
        try:
            yield
        except BaseException as err:
            self.stop()
            if isinstance(err, Interrupted) and self.running:
                names = ", ".join(job.name for job in self.running.values())
                while_training = f"while {names} trained in worker processes (stopped)"
                err.where = f"{err.where}, {while_training}" if err.where else while_training
            raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        """SIGTERM to every worker (workers.WorkerStopped): a run stops where it is and leaves
        no stage marker, so the next command trains it again from the start (overwrite=true)."""
        for process in set(multiprocessing.active_children()) - self._children_before:
            process.terminate()
