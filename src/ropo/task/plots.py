"""Report stage, the figures: results.json, sweep_results.json and each run's pairs.jsonl and
train_log.jsonl drawn as the PNGs of report.md. Figures use matplotlib's object API (no pyplot
state, no global backend switch): `Figure.savefig` renders with Agg.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ropo.task.tables import drop_precision, sweep_rows

COLORS = {
    "sft": "#777777",
    "dpo_clean": "#2ca02c",
    "dpo": "#d62728",
    "ropo_loss": "#ff7f0e",
    "ropo": "#1f77b4",
    "ropo_rs": "#9467bd",
}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_summary(results: dict[str, Any], path: Path) -> None:
    """Bars per method: held-out gold reward, win rate against SFT, held-out preference accuracy."""
    runs = results["runs"]
    names = ["SFT"] + [r["label"] for r in runs]
    colors = [COLORS["sft"]] + [COLORS[r["method"]] for r in runs]
    panels = [
        (
            "gold reward of samples (higher is better)",
            [results["sft"]["gold_reward"]] + [r["scores"]["gold_reward"] for r in runs],
            [results["sft"]["gold_reward_se"]] + [r["scores"]["gold_reward_se"] for r in runs],
        ),
        (
            "win rate against SFT (0.5 = no better)",
            [0.5] + [r["scores"]["win_rate"] for r in runs],
            None,
        ),
        (
            "held-out preference accuracy (clean pairs)",
            [float("nan")] + [r["scores"]["preference_accuracy"] for r in runs],
            None,
        ),
    ]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    for ax, (title, values, errors) in zip(fig.subplots(1, 3), panels, strict=True):
        ax.bar(range(len(names)), values, color=colors, yerr=errors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_title(title)
        for i, v in enumerate(values):  # SFT has no implicit reward of its own: nan, no label
            if v == v:
                ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=8)
        if title.startswith("win"):
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
    fig.suptitle(
        f"Held-out results, training labels {results['settings']['noise']:.0%} flipped "
        "(DPO, clean labels: 0% flipped)"
    )
    fig.savefig(path, dpi=110)


def plot_filtering(results: dict[str, Any], path: Path) -> bool:
    """Per round: precision and recall of the dropped set as a detector of flipped pairs."""
    runs = [r for r in results["runs"] if len(r["rounds"]) > 1 and r["noise"] > 0]
    if not runs:
        return False
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key in zip(axes, ("drop_precision", "drop_recall"), strict=True):
        for run in runs:
            rounds = [r["round"] for r in run["rounds"]]
            ax.plot(
                rounds,
                [r[key] for r in run["rounds"]],
                "o-",
                label=run["label"],
                color=COLORS[run["method"]],
            )
        ax.set_xticks(rounds)
        ax.set_xlabel("round (pairs dropped after it)")
        ax.set_ylim(0, 1.02)
        ax.set_title(key.replace("_", " ") + " of the dropped set")
    axes[0].axhline(
        runs[0]["noise"],
        color="black",
        ls="--",
        lw=0.8,
        label=f"dropping at random ({runs[0]['noise']:g})",
    )
    axes[0].legend()
    fig.savefig(path, dpi=110)
    return True


def plot_margins(out: Path, results: dict[str, Any], path: Path) -> bool:
    """Histograms of the final-round margin for clean and flipped training pairs, one per run."""
    runs = [r for r in results["runs"] if r["noise"] > 0]
    if not runs:
        return False
    fig = Figure(figsize=(4.2 * len(runs), 3.8), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs, strict=True):
        records = _read_jsonl(out / run["run_dir"] / "pairs.jsonl")
        last_round = max(r["round"] for r in records)
        last = [r for r in records if r["round"] == last_round]
        for flipped, color, name in ((False, "#2ca02c", "clean"), (True, "#d62728", "flipped")):
            margins = [r["margin"] for r in last if r["flipped"] == flipped]
            ax.hist(margins, bins=40, alpha=0.6, color=color, label=f"{name} ({len(margins)})")
        dropped = [r["margin"] for r in last if not r["kept"]]
        if dropped:
            ax.axvline(max(dropped), color="black", ls="--", lw=0.8, label="dropped below")
        ax.set_title(run["label"])
        ax.set_xlabel("margin Δ (log-ratio chosen − rejected)")
        ax.legend(fontsize=8)
    fig.suptitle(
        "Training pairs after the last round: a flipped pair the model disagrees with has Δ < 0"
    )
    fig.savefig(path, dpi=110)
    return True


def plot_training(out: Path, results: dict[str, Any], path: Path) -> None:
    """Loss and reward accuracy (on the noisy training labels) per logged step."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for run in results["runs"]:
        log = _read_jsonl(out / run["run_dir"] / "train_log.jsonl")
        steps = [r["step"] for r in log]
        for ax, key in zip(axes, ("loss", "reward_accuracy"), strict=True):
            values = smooth([r[key] for r in log])
            ax.plot(steps, values, label=run["label"], lw=1.2, color=COLORS[run["method"]])
    axes[0].set_title("training loss (DPO and ROPO losses differ in scale)")
    noise = results["settings"]["noise"]
    axes[1].set_title(
        "reward accuracy on the training batch, against its labels\n"
        f"(with {noise:.0%} flipped, a model that is always right scores {1 - noise:g})"
    )
    for ax in axes:
        ax.set_xlabel("optimizer step")
    axes[1].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing moving average: single batches are too noisy to read a trend from."""
    windows = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    """Gold reward, win rate and drop precision against the flip rate; bars span the seeds."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    groups = sweep_rows(sweep)
    keys = (
        ("gold reward of samples", lambda r: r["scores"]["gold_reward"]),
        ("win rate against SFT", lambda r: r["scores"]["win_rate"]),
        ("drop precision, last round", drop_precision),
    )
    for method in dict.fromkeys(m for m, _ in groups):
        noises = sorted(n for m, n in groups if m == method)
        for ax, (title, get) in zip(axes, keys, strict=True):
            points = [
                (n, [v for v in map(get, groups[(method, n)]) if v is not None]) for n in noises
            ]
            points = [(n, v) for n, v in points if v]
            if not points:
                continue
            means = [sum(v) / len(v) for _, v in points]
            spread = [
                [m - min(v) for m, (_, v) in zip(means, points, strict=True)],
                [max(v) - m for m, (_, v) in zip(means, points, strict=True)],
            ]
            ax.errorbar(
                [n for n, _ in points],
                means,
                yerr=spread,
                fmt="o-",
                capsize=3,
                label=groups[(method, noises[0])][0]["label"],
                color=COLORS[method],
            )
            ax.set_title(title)
            ax.set_xlabel("share of training labels flipped (η)")
    axes[0].axhline(sweep["sft"]["gold_reward"], color=COLORS["sft"], ls="--", label="SFT")
    axes[1].axhline(0.5, color=COLORS["sft"], ls="--", label="SFT")
    axes[2].plot([0, 0.5], [0, 0.5], color="black", ls="--", lw=0.8, label="dropping at random")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
