"""The built-in demonstration, end to end: task -> tokenizer -> SFT -> pairs -> DPO / ROPO runs
(through `ropo.train`, which injects the label noise) -> held-out evaluation -> report.

The stages live in stages.py, each skipped on a rerun that finds its inputs unchanged
(stage_cache.py); this module runs them for one demonstration or a noise sweep.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ropo.data import load_pairs
from ropo.interrupt import Interrupted
from ropo.resources import pick_device
from ropo.task import evaluate, report, tables
from ropo.task.settings import METHOD_LABELS, TaskSettings, parse_settings
from ropo.task.stage_cache import StageResult, stage_seconds
from ropo.task.stages import (
    load_task,
    sft_model,
    stage_eval,
    stage_pairs,
    stage_sft,
    stage_task,
    stage_train,
)


@dataclass
class Prepared:
    """Stages 1-3 and the SFT model's evaluation, shared by every run of a demo or a sweep."""

    pairs: StageResult
    sft_eval: StageResult
    judge: Callable[[], evaluate.Judge]


def prepare(s: TaskSettings, out: Path) -> Prepared:
    if s.threads:
        torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    pairs = stage_pairs(s, out, stage_task(s, out), stage_sft(s, out))
    cache: list[evaluate.Judge] = []

    def judge() -> evaluate.Judge:  # built on first use: a fully cached rerun never loads models
        if not cache:
            heldout, _ = load_pairs(out / "pairs_heldout.jsonl")
            prompts = load_task(out).heldout_prompts
            cache.append(
                evaluate.Judge(
                    sft_model(out),
                    prompts,
                    heldout,
                    s.eval_samples,
                    s.temperature,
                    s.max_new_tokens,
                    s.seed + 100,
                    pick_device(s.device),
                )
            )
        return cache[0]

    sft_eval = stage_eval(s, out, "sft", sft_model(out), [pairs.key], judge)
    return Prepared(pairs, sft_eval, judge)


def run_method(
    s: TaskSettings,
    out: Path,
    prepared: Prepared,
    method: str,
    noise: float,
    seed: int,
    run_dir: Path,
) -> dict[str, Any]:
    """Train one method (stage 5) and evaluate it (stage 6): one row of the results."""
    trained = stage_train(s, out, method, noise, seed, run_dir, prepared.pairs)
    name = str(run_dir.relative_to(out))
    upstream = [trained.key, prepared.sft_eval.key]
    scored = stage_eval(s, out, name, run_dir / "final", upstream, prepared.judge)
    return {
        "method": method,
        "label": METHOD_LABELS[method],
        "noise": noise,
        "seed": seed,
        "run_dir": name,
        "train_seconds": trained.seconds,
        **scored.result,
    }


def run_builtin(settings: TaskSettings, out: Path) -> dict[str, Any]:
    """The default demonstration: every method of `settings.methods` at noise `settings.noise`
    (dpo_clean at 0), evaluated on held-out prompts; writes results.json and report.md."""
    start, out = time.perf_counter(), Path(out)
    prepared = prepare(settings, out)
    runs = []
    for method in settings.methods:
        noise = 0.0 if method == "dpo_clean" else settings.noise
        runs.append(run_method(settings, out, prepared, method, noise, settings.seed, out / method))
    results = {
        "settings": asdict(settings),
        "pairs": prepared.pairs.result,
        "sft": prepared.sft_eval.result["scores"],
        "runs": runs,
        "stage_seconds": stage_seconds(out),
        "wall_seconds": time.perf_counter() - start,
    }
    _write_results(out, "results.json", results, tables.results_table(results))
    return results


def run_sweep(
    settings: TaskSettings,
    out: Path,
    noises: tuple[float, ...] = (0.0, 0.2, 0.4),
    seeds: tuple[int, ...] = (0, 1),
    methods: tuple[str, ...] = ("dpo", "ropo"),
) -> dict[str, Any]:
    """Each method at each noise rate and training seed, reusing stages 1-3 of `out`; writes
    sweep_results.json and adds the noise plots to report.md."""
    start, out = time.perf_counter(), Path(out)
    prepared = prepare(settings, out)
    rows = []
    for noise in noises:
        for seed in seeds:
            for method in methods:
                run_dir = out / "sweep" / f"noise{noise:g}-seed{seed}" / method
                rows.append(run_method(settings, out, prepared, method, noise, seed, run_dir))
    sweep = {
        "settings": asdict(settings),
        "sft": prepared.sft_eval.result["scores"],
        "runs": rows,
        "wall_seconds": time.perf_counter() - start,
    }
    _write_results(out, "sweep_results.json", sweep, tables.sweep_table(sweep))
    return sweep


def _write_results(out: Path, filename: str, results: dict[str, Any], table: str) -> None:
    # The JSON first: the report and the printed table are both built from what is on disk.
    (out / filename).write_text(json.dumps(results, indent=1))
    report.write_report(out)
    print(table)
    print(f"report: {out / 'report.md'}  ({results['wall_seconds']:.0f} s this time)")


def main(argv: list[str] | None = None) -> int:
    """`python -m ropo.task.pipeline [out=DIR] [sweep=true] [setting=value ...]`."""
    out: Path | str = "its out= directory"
    try:
        settings, out, sweep = parse_settings(sys.argv[1:] if argv is None else argv)
        pick_device(settings.device)  # device=cuda without CUDA fails now, not after stage 1
        (run_sweep if sweep else run_builtin)(settings, out)
    except (ValueError, FileNotFoundError) as err:
        print(f"ropo builtin: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(
            f"ropo builtin: interrupted by {stop} {stop.where}; the finished stages are kept in "
            f"{out} and skipped next time: run the same command again to continue",
            file=sys.stderr,
        )
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
