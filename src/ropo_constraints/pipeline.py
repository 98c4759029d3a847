"""The constraint task end to end: prompts -> the instruct model's own samples -> pairs ranked by
the gold reward -> DPO and ROPO runs at each noise rate and seed -> greedy answers to held-out
prompts, scored -> summary.json and report.md.

Every stage is in stages.py and is skipped when a rerun finds it done; `main` is the command line
(`python -m ropo_constraints out=DIR key=value ...`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ropo import interrupt
from ropo.config_load import load_settings
from ropo_builtin.stage_cache import stage_seconds
from ropo_constraints.evaluate import summarise_cell
from ropo_constraints.report import results_table, write_report
from ropo_constraints.settings import ConstraintSettings, describe_constraint_settings
from ropo_constraints.stages import (
    run_name,
    stage_eval,
    stage_pairs,
    stage_prompts,
    stage_samples,
    stage_train,
)

COMMAND = "python -m ropo_constraints"


def run_task(s: ConstraintSettings) -> dict[str, Any]:
    """Every stage for every method, noise rate and seed of `s`; writes <out>/summary.json and
    <out>/report.md and returns the summary."""
    start, out = time.perf_counter(), Path(s.out)
    if s.threads:
        torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    prompts = stage_prompts(s, out)
    pairs = stage_pairs(s, out, stage_samples(s, out, prompts))
    instruct = stage_eval(s, out, "instruct", s.model, [prompts.key])
    runs = []
    for noise in s.noise:
        for seed in s.seeds:
            for method in s.methods:
                trained = stage_train(s, out, method, noise, seed, pairs)
                name = run_name(method, noise, seed)
                final = str(out / "runs" / name / "final")
                scored = stage_eval(s, out, name, final, [trained.key, prompts.key])
                run = {"method": method, "noise": noise, "seed": seed}
                run |= {"train_seconds": trained.seconds, **trained.result, **scored.result}
                runs.append(run)
    summary = {
        "settings": asdict(s),
        "pairs": pairs.result,
        "instruct": {"method": "instruct", **_without_rewards(instruct.result)},
        "cells": cells(runs, s),
        "runs": [_without_rewards(run) for run in runs],
        "stage_seconds": stage_seconds(out),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report = write_report(out)
    print(results_table(summary))
    print(f"report: {report}")
    return summary


def cells(runs: list[dict[str, Any]], s: ConstraintSettings) -> list[dict[str, Any]]:
    """One summarise_cell per method and noise rate, over the seeds."""
    rows = []
    for method in s.methods:
        for noise in s.noise:
            group = [r for r in runs if r["method"] == method and r["noise"] == noise]
            rows.append({"method": method, "noise": noise, **summarise_cell(group)})
    return rows


def _without_rewards(result: dict[str, Any]) -> dict[str, Any]:
    """A scored result without its per-prompt list (kept once, in the stage files)."""
    return {key: value for key, value in result.items() if key != "per_prompt"}


def main(argv: list[str] | None = None) -> int:
    """`python -m ropo_constraints out=DIR [key=value ...]`: 0 when done, 2 with one line on a
    user's error, 128 + N on signal N (the finished stages are kept)."""
    words = sys.argv[1:] if argv is None else argv
    if any(word in ("-h", "--help") for word in words):
        usage = f"usage: {COMMAND} out=DIR [key=value ...]"
        print(f"{usage}\n\n{__doc__}\n{describe_constraint_settings()}")
        return 0
    settings = None
    try:
        with interrupt.handled():
            settings = load_settings(ConstraintSettings, words, COMMAND)
            run_task(settings)
    except interrupt.Interrupted as stop:
        out = settings.out if settings else "its out= directory"
        print(
            f"ropo_constraints: interrupted by {stop} {stop.where}; the finished stages are kept "
            f"in {out} and skipped next time: run the same command again to continue",
            file=sys.stderr,
        )
        return stop.exit_code
    except (ValueError, FileNotFoundError) as err:
        print(f"ropo_constraints: error: {err}", file=sys.stderr)
        return 2
    return 0
