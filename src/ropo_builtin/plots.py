"""Report stage, the figures: results.json, sweep_results.json and each run's pairs.jsonl and
train_log.jsonl drawn as the PNGs of report.md. Figures use matplotlib's object API (no pyplot
state, no global backend switch): `Figure.savefig` renders with Agg.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ropo.jsonl import read_jsonl
from ropo_builtin.tables import sweep_label

COLORS = {
    "sft": "#777777",
    "dpo_clean": "#2ca02c",
    "dpo": "#d62728",
    "cdpo": "#8c564b",
    "cdpo_half": "#c49c94",
    "rdpo": "#e377c2",
    "rdpo_half": "#f7b6d2",
    "ipo": "#bcbd22",
    "ropo_loss": "#ff7f0e",
    "ropo": "#1f77b4",
    "ropo_rs": "#9467bd",
    "ropo_auto": "#17becf",
    "ropo_auto_margin": "#7f7f7f",
}


def color(method: str) -> str:
    """The method's colour in every figure; black for a method without one of its own."""
    return COLORS.get(method, "#000000")


def plot_summary(results: dict[str, Any], path: Path) -> None:
    """Bars per method: held-out gold reward, win rate against SFT, held-out preference accuracy."""
    runs = results["runs"]
    names = ["SFT"] + [r["label"] for r in runs]
    colors = [COLORS["sft"]] + [color(r["method"]) for r in runs]
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
                color=color(run["method"]),
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
        records = read_jsonl(out / run["run_dir"] / "pairs.jsonl")
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
        log = read_jsonl(out / run["run_dir"] / "train_log.jsonl")
        steps = [r["step"] for r in log]
        for ax, key in zip(axes, ("loss", "reward_accuracy"), strict=True):
            values = smooth([r[key] for r in log])
            ax.plot(steps, values, label=run["label"], lw=1.2, color=color(run["method"]))
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
    """Gold reward, and its paired difference to DPO, against the flip rate η for every method;
    the bars are 95% bootstrap intervals over seeds and prompts (sweep_stats.py)."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    cells = sweep["statistics"]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    for offset, method in enumerate(methods):
        shift = (offset - (len(methods) - 1) / 2) * 0.004  # side by side: bars do not overlap
        mine = sorted((c for c in cells if c["method"] == method), key=lambda c: c["noise"])
        for ax, key in zip(axes, ("gold_reward", "vs_dpo"), strict=True):
            points = [(c["noise"] + shift, c[key]) for c in mine if c[key] is not None]
            if not points:
                continue
            ax.errorbar(
                [x for x, _ in points],
                [i["estimate"] for _, i in points],
                yerr=[
                    [i["estimate"] - i["low"] for _, i in points],
                    [i["high"] - i["estimate"] for _, i in points],
                ],
                fmt="o-",
                capsize=3,
                label=sweep_label(sweep, method),
                color=color(method),
            )
    axes[0].axhline(sweep["sft"]["gold_reward"], color=COLORS["sft"], ls="--", label="SFT")
    axes[0].set_title("gold reward on held-out prompts (higher is better)")
    axes[1].axhline(0, color="black", lw=0.8, ls="--")
    axes[1].set_title("difference to DPO at the same η (same seeds, same prompts)")
    for ax in axes:
        ax.set_xlabel("share of training labels flipped (η)")
    axes[0].legend(fontsize=8)
    seeds = sweep["settings"]["sweep_seeds"]
    fig.suptitle(
        f"Means over {len(seeds)} seeds; bars: 95% paired bootstrap intervals over seeds and "
        "held-out prompts"
    )
    fig.savefig(path, dpi=110)
