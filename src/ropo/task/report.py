"""Last stage of the built-in pipeline: results.json and the runs' audit files -> report.md, PNGs.

Reads only files (results.json, sweep_results.json, each run's pairs.jsonl and train_log.jsonl),
so a report can be redrawn without training. Figures use matplotlib's object API (no pyplot
state, no global backend switch): `Figure.savefig` renders with Agg.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

COLORS = {
    "sft": "#777777",
    "dpo_clean": "#2ca02c",
    "dpo": "#d62728",
    "ropo_loss": "#ff7f0e",
    "ropo": "#1f77b4",
    "ropo_rs": "#9467bd",
}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(results: dict[str, Any]) -> str:
    """The default run as a Markdown table (readable on a terminal too)."""
    head = (
        "| method | noise | gold reward | exact | win vs SFT | held-out pref. acc. "
        "| drop precision | drop recall | train s |"
    )
    lines = [head, "|" + "---|" * 9]
    sft = results["sft"]
    lines.append(
        f"| SFT (reference) | - | {_fmt(sft['gold_reward'])} ± "
        f"{_fmt(sft['gold_reward_se'])} | {_fmt(sft['exact_match'])} | 0.5 | - | - | - "
        f"| - |"
    )
    for run in results["runs"]:
        scores, last = run["scores"], run["rounds"][-1]
        if not last["n_dropped"]:  # nothing dropped (DPO): there is no detector to score
            last = {"drop_precision": None, "drop_recall": None}
        lines.append(
            f"| {run['label']} | {run['noise']:g} | {_fmt(scores['gold_reward'])} ± "
            f"{_fmt(scores['gold_reward_se'])} | {_fmt(scores['exact_match'])} "
            f"| {_fmt(scores['win_rate'])} | {_fmt(scores['preference_accuracy'])} "
            f"| {_fmt(last['drop_precision'])} | {_fmt(last['drop_recall'])} "
            f"| {run['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def sweep_rows(sweep: dict[str, Any]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """The sweep's runs grouped by (method, noise), one entry per seed."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for run in sweep["runs"]:
        groups[(run["method"], run["noise"])].append(run)
    return groups


def drop_precision(run: dict[str, Any]) -> float | None:
    """The last round's drop precision; None without flips, where every drop is "wrong"."""
    return run["rounds"][-1]["drop_precision"] if run["noise"] > 0 else None


def sweep_table(sweep: dict[str, Any]) -> str:
    """Mean over seeds (min-max in brackets) of each method at each noise rate."""
    lines = [
        "| method | noise | seeds | gold reward | win vs SFT | drop precision (last round) |",
        "|" + "---|" * 6,
    ]
    for (_, noise), runs in sorted(sweep_rows(sweep).items(), key=lambda kv: kv[0][::-1]):
        cells = []
        for values in (
            [r["scores"]["gold_reward"] for r in runs],
            [r["scores"]["win_rate"] for r in runs],
            [drop_precision(r) for r in runs],
        ):
            known = [v for v in values if v is not None]
            cells.append(
                f"{sum(known) / len(known):.3f} [{min(known):.3f}, {max(known):.3f}]"
                if known
                else "-"
            )
        label = runs[0]["label"]
        lines.append(f"| {label} | {noise:g} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
            rounds = [r["round"] + 1 for r in run["rounds"]]
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


def findings(results: dict[str, Any]) -> list[str]:
    """Plain sentences comparing the methods, with their sampling error; no claim is assumed."""
    runs = {r["method"]: r for r in results["runs"]}
    gold = {m: r["scores"]["gold_reward"] for m, r in runs.items()}
    se = {m: r["scores"]["gold_reward_se"] for m, r in runs.items()}
    noise = results["settings"]["noise"]

    def gap(a: str, b: str) -> str:
        noise_level = 2 * (se[a] ** 2 + se[b] ** 2) ** 0.5
        beyond = abs(gold[a] - gold[b]) >= noise_level
        verdict = "beyond sampling noise" if beyond else "within sampling noise"
        return f"{gold[a] - gold[b]:+.3f} (±{noise_level:.3f} at 2 s.e.: {verdict})"

    lines = [
        f"SFT samples score {results['sft']['gold_reward']:.3f} gold reward on held-out "
        "prompts; every method starts from this model and uses it as the reference."
    ]
    if "dpo" in gold and "dpo_clean" in gold:
        lines.append(
            f"Flipping {noise:.0%} of the training labels changes DPO's gold reward by "
            f"{gap('dpo', 'dpo_clean')} against DPO on clean labels."
        )
    for method in ("ropo_loss", "ropo", "ropo_rs"):
        if method in gold and "dpo" in gold:
            lines.append(
                f"{runs[method]['label']} against DPO on the same noisy pairs: "
                f"{gap(method, 'dpo')}; win rate against SFT "
                f"{_fmt(runs[method]['scores']['win_rate'])} vs DPO's "
                f"{_fmt(runs['dpo']['scores']['win_rate'])}."
            )
            if "dpo_clean" in gold and gold["dpo_clean"] > gold["dpo"]:
                share = (gold[method] - gold["dpo"]) / (gold["dpo_clean"] - gold["dpo"])
                lines.append(f"That is {share:.0%} of what the noise cost DPO.")
    if "ropo_rs" in gold and "ropo" in gold:
        lines.append(f"ROPO + RS against ROPO without RS: {gap('ropo_rs', 'ropo')}.")
    for method in ("ropo", "ropo_rs"):
        if method in runs and noise > 0:
            last = runs[method]["rounds"][-1]
            lines.append(
                f"{runs[method]['label']}: after the last round the dropped pairs were "
                f"{_fmt(last['drop_precision'])} flipped (dropping at random: {noise:g}), "
                f"and they held {_fmt(last['drop_recall'])} of all flipped pairs."
            )
    lines.append(
        "One training seed: the ± above covers the sampling of the evaluation, not the "
        "run-to-run spread of training; the noise sweep (several seeds) shows that."
    )
    return lines


def sweep_findings(sweep: dict[str, Any]) -> list[str]:
    """One sentence per noise rate: ROPO's mean gold reward minus DPO's, whichever way it goes."""
    groups = sweep_rows(sweep)
    lines = []
    for noise in sorted({n for _, n in groups}):
        if ("dpo", noise) in groups and ("ropo", noise) in groups:
            ropo, dpo = (
                [r["scores"]["gold_reward"] for r in groups[(m, noise)]] for m in ("ropo", "dpo")
            )
            gap = sum(ropo) / len(ropo) - sum(dpo) / len(dpo)
            verdict = "ROPO ahead" if gap > 0 else "DPO ahead"
            lines.append(f"η = {noise:g}: ROPO − DPO = {gap:+.3f} gold reward ({verdict}).")
    return lines


def write_report(out: Path) -> Path:
    """report.md and its figures, from <out>/results.json and <out>/sweep_results.json."""
    out = Path(out)
    parts = ["# ROPO on the built-in sorting task", ""]
    if (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
        parts += default_section(out, results)
    if (out / "sweep_results.json").is_file():
        sweep = json.loads((out / "sweep_results.json").read_text())
        plot_sweep(sweep, out / "noise_sweep.png")
        parts += [
            "## Noise sweep",
            "",
            "DPO and ROPO at several flip rates η, each over several training seeds "
            "(seeds change which labels are flipped and the batch order); the points are "
            "means, the bars the range over seeds.",
            "",
            "![noise sweep](noise_sweep.png)",
            "",
            sweep_table(sweep),
            "",
            *[f"- {line}" for line in sweep_findings(sweep)],
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def default_section(out: Path, results: dict[str, Any]) -> list[str]:
    s, pairs = results["settings"], results["pairs"]
    train = pairs["train"]
    parts = [
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
        f"policy (best vs worst of {s['rs_k']} by implicit reward) per dropped prompt.",
        f"- Evaluation: {s['eval_samples']} samples per held-out prompt "
        f"({s['n_heldout_prompts']} prompts never used in training) at temperature "
        f"{s['temperature']:g}, scored by the gold reward; win rate against SFT samples (ties "
        f"count 1/2); preference accuracy of the implicit reward on {pairs['heldout']['pairs']} "
        "clean held-out pairs.",
        "",
        "## Results",
        "",
        results_table(results),
        "",
        "Gold reward ± one standard error over prompts. Drop precision/recall: the last "
        "round's dropped pairs as a detector of flipped labels.",
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
