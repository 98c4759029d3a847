"""Last stage: summary.json -> report.md (and noise.png when matplotlib draws).

Reads only the summary that pipeline.py writes, so a report can be redrawn without running
anything. The table has one row per method and noise rate: the gold reward of greedy answers to
the held-out prompts, averaged over training seeds, with a 95% bootstrap interval over prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METHOD_LABELS = {
    "instruct": "instruct model (start)",
    "dpo": "DPO",
    "ropo": "ROPO",
    "ropo_auto": "ROPO (rho=auto)",
}


def results_table(summary: dict[str, Any]) -> str:
    """The markdown table: method x noise, mean gold reward [95% CI], share obeying all, seeds."""
    lines = [
        "| method | noise η | gold reward | 95% CI (prompts) | obeys all | seeds | sd over seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in [summary["instruct"], *summary["cells"]]:
        noise = "-" if cell["method"] == "instruct" else f"{cell['noise']:g}"
        sd = "-" if cell.get("seed_sd") is None else f"{cell['seed_sd']:.3f}"
        lines.append(
            f"| {METHOD_LABELS[cell['method']]} | {noise} | {cell['mean']:.3f} | "
            f"{cell['ci_low']:.3f} – {cell['ci_high']:.3f} | {cell['obeys_all']:.1%} | "
            f"{cell.get('seeds', 1)} | {sd} |"
        )
    return "\n".join(lines)


def runs_table(summary: dict[str, Any]) -> str:
    """One row per training run: its seed's score and, for ROPO, what its last round dropped."""
    lines = [
        "| method | noise η | seed | gold reward | 95% CI | obeys all | cut at the limit "
        "| drop precision | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in summary["runs"]:
        precision = run["last_round"].get("drop_precision")
        shown = "-" if precision is None else f"{precision:.2f}"
        lines.append(
            f"| {METHOD_LABELS[run['method']]} | {run['noise']:g} | {run['seed']} | "
            f"{run['mean']:.3f} | {run['ci_low']:.3f} – {run['ci_high']:.3f} | "
            f"{run['obeys_all']:.1%} | {cut_share(run):.0%} | {shown} | "
            f"{run['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def cut_share(scored: dict[str, Any]) -> float:
    """Share of a policy's held-out answers that ran into max_new_tokens (finish "length"): an
    answer cut short may break a constraint it would have kept."""
    finish = scored["generation"]["finish"]
    return finish.get("length", 0) / max(sum(finish.values()), 1)


def describe_run(summary: dict[str, Any]) -> list[str]:
    """The lines that say what was run: model, prompts, pairs and training settings."""
    s, pairs = summary["settings"], summary["pairs"]
    training = f"lora_rank={s['lora_rank']}" if s["lora_rank"] else "full fine-tuning"
    return [
        f"- Model: `{s['model']}` (template `{s['template']}`, {s['dtype']}).",
        f"- Prompts: {s['n_train_prompts']} for training, {s['n_heldout_prompts']} held out; "
        "each a topic plus 1-2 verifiable constraints (src/ropo_constraints/constraints.py).",
        f"- Pairs: {s['k']} samples per prompt at temperature {s['temperature']:g}, at most "
        f"{s['max_new_tokens']} new tokens; chosen = best gold reward, rejected = worst. "
        f"{pairs['pairs']} pairs, {pairs['skipped_ties']} prompts skipped (all samples tied). "
        f"Mean gold reward of all samples {pairs['mean_reward']:.3f}; of the pairs: chosen "
        f"{pairs['mean_chosen_reward']:.3f}, rejected {pairs['mean_rejected_reward']:.3f}; "
        f"{pairs['chosen_obeys_all']:.0%} of chosen responses obey every constraint.",
        f"- Training: {training}, lr {s['lr']:g}, beta {s['beta']:g}, batch {s['batch_size']}; "
        f"ROPO {s['rounds']} round(s) of {s['epochs']} epoch(s), rho {s['rho']}, alpha "
        f"{s['alpha']:g}; DPO {s['rounds'] * s['epochs']} epoch(s) in one round; ROPO (rho=auto) "
        f"one ROPO round, then drops the flip share it estimates from the policy's preferences "
        f"and trains DPO afresh for {s['rounds'] * s['epochs']} epoch(s). Labels flipped "
        "at rate η by `ropo train` (noise=η), a fresh draw per seed.",
        "- Evaluation: greedy answers to the held-out prompts, at most "
        f"{s['max_new_tokens']} new tokens ({cut_share(summary['instruct']):.0%} of the instruct "
        "model's answers reach that limit); gold reward in [0, 1] (share of constraints obeyed, "
        "plus 0.1 x closeness); CI = 95% percentile bootstrap over prompts of the "
        "seed-averaged rewards.",
    ]


def write_report(out: Path, title: str = "DPO vs ROPO on verifiable constraints") -> Path:
    """<out>/report.md (and noise.png) from <out>/summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    parts = [f"# {title}", "", "## What was run", "", *describe_run(summary), ""]
    parts += ["## Results", "", results_table(summary), ""]
    parts += ["### Every run", "", runs_table(summary), ""]
    if plot_noise(summary, out / "noise.png"):
        parts += ["![gold reward against noise](noise.png)", ""]
    parts += [f"Wall time of this invocation: {summary['wall_seconds']:.0f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def plot_noise(summary: dict[str, Any], path: Path) -> bool:
    """Gold reward against the flip rate per method, bars = the 95% CI; False without matplotlib
    (an optional figure: the table holds the same numbers)."""
    try:
        from matplotlib.figure import Figure  # object API: no pyplot state, renders with Agg
    except ImportError:
        return False
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    methods = list(dict.fromkeys(cell["method"] for cell in summary["cells"]))
    for i, method in enumerate(methods):
        cells = sorted((c for c in summary["cells"] if c["method"] == method), key=_noise)
        means = [c["mean"] for c in cells]
        errors = [[m - c["ci_low"] for m, c in zip(means, cells, strict=True)],
                  [c["ci_high"] - m for m, c in zip(means, cells, strict=True)]]  # fmt: skip
        shift = (i - (len(methods) - 1) / 2) * 0.006  # side by side, so equal points both show
        ax.errorbar([_noise(c) + shift for c in cells], means, yerr=errors, fmt="o-", capsize=3,
                    label=METHOD_LABELS[method])  # fmt: skip
    ax.axhline(summary["instruct"]["mean"], color="#777777", ls="--", label="instruct model")
    ax.set_xticks(sorted({_noise(cell) for cell in summary["cells"]}))
    ax.set_xlabel("share of training labels flipped (η)")
    ax.set_ylabel("held-out gold reward (greedy)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _noise(cell: dict[str, Any]) -> float:
    return cell["noise"]
