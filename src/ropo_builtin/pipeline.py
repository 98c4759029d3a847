"""The built-in demonstration, end to end: task -> tokenizer -> SFT -> pairs -> DPO / ROPO runs
(through `ropo.train`, which injects the label noise) -> held-out evaluation -> report.

The stages live in stages.py, each skipped on a rerun that finds its inputs unchanged
(stage_cache.py); runs.py trains the preference runs (in `jobs` worker processes) and evaluates
them; sweep_stats.py compares them. This module runs them for one demonstration or a sweep.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ropo.config_fields import describe_settings
from ropo.config_load import load_settings
from ropo.data import load_pairs
from ropo.interrupt import Interrupted
from ropo.resources import pick_device
from ropo_builtin import evaluate, report, tables
from ropo_builtin.runs import PlannedRun, Prepared, run_plan
from ropo_builtin.settings import COMMAND, TaskSettings, equals_dpo
from ropo_builtin.stage_cache import stage_seconds
from ropo_builtin.stages import load_task, sft_model, stage_eval, stage_pairs, stage_sft, stage_task
from ropo_builtin.sweep_stats import sweep_statistics

USAGE = """\
The built-in task end to end: a sorting task with a gold reward, a tokenizer and a tiny Llama
SFT'd from scratch, preference pairs of its samples, DPO and ROPO runs on them with `noise` of
the labels flipped, held-out evaluation, and <out>/report.md. A rerun skips every stage it
finds done; sweep=true runs the noise sweep. `make train` runs it with the defaults."""


def prepare(s: TaskSettings, out: Path) -> Prepared:
    """Stages 1-3 and the SFT model's evaluation; the Judge is built when first needed."""
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


def run_builtin(settings: TaskSettings) -> dict[str, Any]:
    """The default demonstration: every method of `settings.methods` at noise `settings.noise`
    (dpo_clean at 0), evaluated on held-out prompts; writes results.json and report.md."""
    start, out = time.perf_counter(), Path(settings.out)
    prepared = prepare(settings, out)
    plan = [
        PlannedRun(method, 0.0 if method == "dpo_clean" else settings.noise, settings.seed)
        for method in settings.methods
    ]
    runs = run_plan(settings, out, prepared, plan)
    results = {
        "settings": asdict(settings),
        "pairs": prepared.pairs.result,
        "sft": prepared.sft_eval.result["scores"],
        "runs": runs,
        "statistics": sweep_statistics(runs),
        "stage_seconds": stage_seconds(out),
        "wall_seconds": time.perf_counter() - start,
    }
    _write_results(out, "results.json", results, tables.results_table(results))
    return results


def sweep_plan(s: TaskSettings) -> tuple[list[PlannedRun], list[dict[str, Any]]]:
    """Every sweep method at every sweep noise rate and seed; and the (method, η) skipped: cDPO
    and rDPO at η = 0, where ε = 0 makes them DPO (and the table shows DPO's numbers)."""
    plan, skipped = [], []
    for noise in s.sweep_noises:
        runs = []
        for method in s.sweep_methods:
            if equals_dpo(method, noise):
                skipped.append({"method": method, "noise": noise, "reason": "ε = 0: plain DPO"})
            elif noise == 0 and method not in s.sweep_clean_methods:
                reason = "not in sweep_clean_methods"  # to keep `make sweep` near an hour
                skipped.append({"method": method, "noise": noise, "reason": reason})
            else:
                runs.append(method)
        plan += [PlannedRun(m, noise, seed) for seed in s.sweep_seeds for m in runs]
    # Seed by seed: a sweep stopped part-way has whole seeds done, every η in each of them.
    return sorted(plan, key=lambda run: s.sweep_seeds.index(run.seed)), skipped


def run_sweep(settings: TaskSettings) -> dict[str, Any]:
    """Each of `sweep_methods` at each of `sweep_noises` and `sweep_seeds`, reusing stages 1-3
    (and any run the demo trained) of `settings.out`; writes sweep_results.json, with the paired
    statistics of sweep_stats.py, and adds the sweep to report.md."""
    start, out = time.perf_counter(), Path(settings.out)
    prepared = prepare(settings, out)
    plan, skipped = sweep_plan(settings)
    for skip in skipped:
        print(f"sweep: {skip['method']} at noise {skip['noise']:g} not run ({skip['reason']})")
    runs = run_plan(settings, out, prepared, plan)
    sweep = {
        "settings": asdict(settings),
        "sft": prepared.sft_eval.result["scores"],
        "runs": runs,
        "skipped": skipped,
        "statistics": sweep_statistics(runs),
        "wall_seconds": time.perf_counter() - start,
    }
    verdicts = [f"- {line}" for line in tables.sweep_findings(sweep)]
    _write_results(
        out, "sweep_results.json", sweep, "\n".join([tables.sweep_table(sweep), *verdicts])
    )
    return sweep


def _write_results(out: Path, filename: str, results: dict[str, Any], table: str) -> None:
    # The JSON first: the report and the printed table are both built from what is on disk.
    (out / filename).write_text(json.dumps(results, indent=1))
    report.write_report(out)
    print(table)
    print(f"report: {out / 'report.md'}  ({results['wall_seconds']:.0f} s this time)")


def main(argv: list[str] | None = None) -> int:
    """`ropo builtin [key=value ...]` (also `python -m ropo_builtin`): 0 when done, 2 with one
    line on a user's error, 128 + N on signal N (the finished stages are kept)."""
    words = sys.argv[1:] if argv is None else argv
    if any(word in ("-h", "--help") for word in words):
        print(f"usage: {COMMAND} [key=value ...]\n\n{USAGE}\n\n{describe_settings(TaskSettings)}")
        return 0
    out = "its out= directory"
    try:
        settings = load_settings(TaskSettings, words, COMMAND)
        out = settings.out
        pick_device(settings.device)  # device=cuda without CUDA fails now, not after stage 1
        (run_sweep if settings.sweep else run_builtin)(settings)
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
