"""Last stage of the built-in pipeline: results.json and the runs' audit files -> report.md, PNGs.

Reads only files (results.json, sweep_results.json, each run's pairs.jsonl and train_log.jsonl),
so a report can be redrawn without training. The text comes from tables.py, the figures from
plots.py; this module puts them together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ropo_builtin.plots import plot_filtering, plot_margins, plot_summary, plot_sweep, plot_training
from ropo_builtin.stats import RESAMPLES
from ropo_builtin.tables import (
    filtering_table,
    findings,
    results_table,
    sweep_findings,
    sweep_table,
)


def write_report(out: Path) -> Path:
    """report.md and its figures, from <out>/results.json and <out>/sweep_results.json."""
    out = Path(out)
    parts = ["# ROPO on the built-in sorting task", ""]
    if (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
        parts += default_section(out, results)
    if (out / "sweep_results.json").is_file():
        sweep = json.loads((out / "sweep_results.json").read_text())
        parts += sweep_section(out, sweep)
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def what_was_run(results: dict[str, Any]) -> list[str]:
    """The report's description of the task, the methods and the evaluation, from the settings."""
    s, pairs = results["settings"], results["pairs"]
    train = pairs["train"]
    return [
        "## What was run",
        "",
        f"- Task: sort {s['min_len']}-{s['max_len']} numbers (0-9). Gold reward = share of "
        "positions right, divided by the longer of answer and response (0 to 1).",
        f"- SFT: a {s['n_layers']}-layer, width-{s['dim']} Llama trained from scratch for "
        f"{s['sft_steps']} steps on {s['n_sft']} demonstrations, {s['demo_error_rate']:.0%} of "
        "them deliberately wrong, so the model is only partly right.",
        f"- Pairs: {s['samples_per_prompt']} SFT samples for each of {train['prompts']} prompts; "
        f"chosen = best by gold reward, rejected = a worse one; {train['pairs']} pairs "
        f"({train['skipped_ties']} prompts skipped: all samples tied). Mean gold reward "
        f"chosen {train['mean_chosen_reward']:.3f}, rejected {train['mean_rejected_reward']:.3f}.",
        f"- Noise: the training loop flips {s['noise']:.0%} of the training labels at random "
        "(`noise` key); DPO, clean labels is the same DPO run with no flips.",
        f"- DPO trains {s['rounds'] * s['epochs_per_round']} epochs; ROPO trains {s['rounds']} "
        f"rounds of {s['epochs_per_round']} epoch, dropping the {s['rho']:.0%} highest-loss "
        f"pairs after each (alpha={s['alpha']:g}); ROPO + RS also adds one pair sampled from the "
        f"policy per dropped prompt: the most and least likely (per token) of {s['rs_k']} "
        "samples and the dropped pair's two responses (rs_pair_rule=likelihood+original). "
        "ROPO (rho=auto) trains one round of the ROPO loss on all pairs, drops the share of "
        "flipped pairs it estimates from the policy's preferences log pi(chosen)/pi(rejected) "
        "(filter_score=preference; ROPO (rho=auto, margin ranking) ranks by the margin), then "
        "restarts from the SFT model and "
        f"trains DPO for {s['rounds'] * s['epochs_per_round']} epochs on the rest. cDPO and "
        "rDPO are told ε = η (or η/2); they, and IPO, train like DPO.",
        f"- Evaluation: {s['eval_samples']} samples per held-out prompt "
        f"({s['n_heldout_prompts']} prompts never used in training) at temperature "
        f"{s['temperature']:g}, scored by the gold reward; win rate against SFT samples (ties "
        f"count 1/2); preference accuracy of the implicit reward on {pairs['heldout']['pairs']} "
        "clean held-out pairs.",
        "",
    ]


def default_section(out: Path, results: dict[str, Any]) -> list[str]:
    parts = [
        *what_was_run(results),
        "## Results",
        "",
        results_table(results),
        "",
        "Gold reward ± one standard error over prompts. Noise damage recovered: (method − "
        "DPO) / (clean DPO − DPO) [95% bootstrap interval over prompts; one seed, so it "
        "leaves out the run-to-run spread]. Drop precision/recall: the last round's dropped "
        "pairs as a detector of flipped labels.",
        "",
        *[f"- {line}" for line in findings(results)],
        "",
        "![summary](summary.png)",
        "",
    ]
    plot_summary(results, out / "summary.png")
    if plot_filtering(results, out / "filtering.png"):
        parts += [
            "Which pairs did ROPO drop? Precision above the dashed line means its drops "
            "are mostly flipped pairs.",
            "",
            "![filtering](filtering.png)",
            "",
        ]
    if plot_margins(out, results, out / "margins.png"):
        parts += [
            "Margins of the training pairs after training. A model that has not fitted the "
            "flipped labels puts clean pairs at Δ > 0 and flipped pairs at Δ < 0; the more the "
            "two humps overlap, the more it has learnt the flips. The dashed line is ROPO's "
            "last drop threshold: pairs left of it were dropped.",
            "",
            "![margins](margins.png)",
            "",
        ]
    plot_training(out, results, out / "training.png")
    parts += [
        "Training curves:",
        "",
        "![training](training.png)",
        "",
        "Stage times (seconds, when each last ran): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items()),
        "",
    ]
    return parts


def sweep_section(out: Path, sweep: dict[str, Any]) -> list[str]:
    """The sweep's part of report.md: what ran, the statistics table, the filter's numbers, the
    plot (sweep.png) and one verdict per flip rate."""
    s = sweep["settings"]
    plot_sweep(sweep, out / "sweep.png")
    skipped = sorted(
        {f"{x['method']} at η = {x['noise']:g} ({x['reason']})" for x in sweep["skipped"]}
    )
    return [
        "## Noise sweep",
        "",
        f"Every method at flip rates η = {', '.join(f'{n:g}' for n in s['sweep_noises'])}, "
        f"with run seeds {', '.join(map(str, s['sweep_seeds']))} (a seed draws which labels "
        "flip and the batch order; the SFT model, the pairs and the held-out prompts are "
        "shared). cDPO and rDPO are told ε = η (oracle) or η/2; at η = 0 both are plain DPO. "
        f"Not run: {', '.join(skipped) or 'none'}. Clean DPO (DPO at η = 0) "
        "is the ceiling.",
        "",
        "Gold reward: mean over seeds and held-out prompts ± half the width of its 95% "
        "interval. Δ vs DPO: the paired difference to DPO at the same η (same seed, same "
        "prompts) [95% interval]; ✓ marks a method ahead of DPO with 95% confidence. "
        "Recovered: (method − noisy DPO) / (clean DPO − noisy DPO) [95% interval]. Every "
        f"interval is a percentile bootstrap ({RESAMPLES} resamples of seeds and prompts, "
        "ropo_builtin/stats.py).",
        "",
        sweep_table(sweep),
        "",
        *[f"- {line}" for line in sweep_findings(sweep)],
        "",
        "![noise sweep](sweep.png)",
        "",
        "How the filter found the flipped pairs, per round (means over seeds): the true share "
        "of flipped pairs, the rho=auto estimate, the share dropped after the round, and the "
        "precision and recall of the dropped set as a detector of flips.",
        "",
        filtering_table(sweep),
        "",
    ]
