"""Report stage, the text: results.json and sweep_results.json as Markdown tables and as plain
sentences comparing the methods. The pipeline prints the tables; report.py puts it all in report.md.
"""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(results: dict[str, Any]) -> str:
    """The default run as a Markdown table (readable on a terminal too)."""
    head = (
        "| method | noise | gold reward | noise damage recovered | exact | win vs SFT "
        "| held-out pref. acc. | drop precision | drop recall | train s |"
    )
    lines = [head, "|" + "---|" * 10]
    sft = results["sft"]
    lines.append(
        f"| SFT (reference) | - | {_fmt(sft['gold_reward'])} ± "
        f"{_fmt(sft['gold_reward_se'])} | - | {_fmt(sft['exact_match'])} | 0.5 | - | - | - "
        f"| - |"
    )
    for run in results["runs"]:
        scores, last = run["scores"], run["rounds"][-1]
        if not last["n_dropped"]:  # nothing dropped (DPO): there is no detector to score
            last = {"drop_precision": None, "drop_recall": None}
        recovered = run_statistics(results, run).get("recovered")
        lines.append(
            f"| {run['label']} | {run['noise']:g} | {_fmt(scores['gold_reward'])} ± "
            f"{_fmt(scores['gold_reward_se'])} | {_share(recovered)} "
            f"| {_fmt(scores['exact_match'])} "
            f"| {_fmt(scores['win_rate'])} | {_fmt(scores['preference_accuracy'])} "
            f"| {_fmt(last['drop_precision'])} | {_fmt(last['drop_recall'])} "
            f"| {run['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def run_statistics(results: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The sweep_stats cell of a run's method and noise ({} in a results file without one)."""
    key = ("dpo", 0.0) if run["method"] == "dpo_clean" else (run["method"], run["noise"])
    cells = {(c["method"], c["noise"]): c for c in results.get("statistics", [])}
    return cells.get(key, {})


def _share(interval: dict[str, float | None] | None) -> str:
    """A share as a percentage with its interval, e.g. 37% [12%, 60%]; an unbounded end (None,
    from resamples in which the noise did no damage) is shown as ∞."""
    if interval is None:
        return "-"
    low = "-∞" if interval["low"] is None else f"{interval['low']:.0%}"
    high = "∞" if interval["high"] is None else f"{interval['high']:.0%}"
    return f"{interval['estimate']:.0%} [{low}, {high}]"


def _difference(interval: dict[str, float] | None) -> str:
    """A difference with its interval, ✓ when the interval lies above 0."""
    if interval is None:
        return "-"
    mark = " ✓" if interval["low"] > 0 else ""
    return f"{interval['estimate']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]{mark}"


def drop_precision(run: dict[str, Any]) -> float | None:
    """The last round's drop precision; None without flips, where every drop is "wrong"."""
    return run["rounds"][-1]["drop_precision"] if run["noise"] > 0 else None


def sweep_table(sweep: dict[str, Any]) -> str:
    """One row per method, three columns per flip rate η: mean gold reward ± the half-width of
    its 95% interval, the paired difference to DPO at η [95% interval], and the share of the
    noise damage recovered [95% interval]; a skipped method's cells say why."""
    cells = {(c["method"], c["noise"]): c for c in sweep["statistics"]}
    skipped = {(s["method"], s["noise"]): s["reason"] for s in sweep.get("skipped", [])}
    methods = list(dict.fromkeys(m for m, _ in [*cells, *skipped]))
    noises = sorted({n for _, n in [*cells, *skipped]})
    head = ["method"]
    for noise in noises:
        head += [f"η={noise:g} gold reward", f"η={noise:g} Δ vs DPO", f"η={noise:g} recovered"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        row = [sweep_label(sweep, method)]
        for noise in noises:
            cell = cells.get((method, noise))
            if cell is None:
                reason = skipped.get((method, noise), "not run")
                row += [f"({reason})", "-", "-"]
                continue
            gold = cell["gold_reward"]
            row.append(f"{gold['estimate']:.3f} ± {(gold['high'] - gold['low']) / 2:.3f}")
            row += [_difference(cell["vs_dpo"]), _share(cell["recovered"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sweep_label(sweep: dict[str, Any], method: str) -> str:
    """The label of `method` in the sweep's runs (DPO at η = 0 is clean DPO, the ceiling)."""
    labels = {run["method"]: run["label"] for run in sweep["runs"]}
    return labels.get(method, method)


def filtering_table(sweep: dict[str, Any]) -> str:
    """Per filtering method, η and round (averaged over seeds): the true flipped share, the
    rho=auto estimate, the share dropped, and the dropped set's precision and recall."""
    head = "| method | η | after round | flipped | estimated | dropped | precision | recall |"
    lines = [head, "|" + "---|" * 8]
    for cell in sweep["statistics"]:
        for r in cell["filtering"]:
            lines.append(
                f"| {sweep_label(sweep, cell['method'])} | {cell['noise']:g} | {r['round']} "
                f"| {_fmt(r['flipped_share'])} | {_fmt(r['noise_estimate'])} "
                f"| {_fmt(r['dropped_share'])} | {_fmt(r['drop_precision'])} "
                f"| {_fmt(r['drop_recall'])} |"
            )
    return "\n".join(lines)


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
    for method in [m for m in runs if m not in ("dpo", "dpo_clean") and "dpo" in runs]:
        cell = run_statistics(results, runs[method])
        lines.append(
            f"{runs[method]['label']} against DPO on the same noisy pairs: "
            f"{_difference(cell.get('vs_dpo'))}; win rate against SFT "
            f"{_fmt(runs[method]['scores']['win_rate'])} vs DPO's "
            f"{_fmt(runs['dpo']['scores']['win_rate'])}."
        )
        if cell.get("recovered"):
            lines.append(f"That is {_share(cell['recovered'])} of what the noise cost DPO.")
    if "ropo_rs" in gold and "ropo" in gold:
        lines.append(f"ROPO + RS against ROPO without RS: {gap('ropo_rs', 'ropo')}.")
    for method in [m for m in ("ropo", "ropo_rs") if m in runs and noise > 0]:
        last = runs[method]["rounds"][-1]
        lines.append(
            f"{runs[method]['label']}: after the last round the dropped pairs were "
            f"{_fmt(last['drop_precision'])} flipped (dropping at random: {noise:g}), "
            f"and they held {_fmt(last['drop_recall'])} of all flipped pairs."
        )
    if "ropo_auto" in runs:
        lines.append(auto_rho_finding(runs["ropo_auto"]))
    lines.append(
        "Differences to DPO and recovered shares come with 95% paired bootstrap intervals "
        "over prompts (✓: the interval lies above 0). One training seed: the ± and the "
        "intervals cover the sampling of the evaluation, not the run-to-run spread of "
        "training; the sweep (several seeds) covers that too."
    )
    return lines


def auto_rho_finding(run: dict[str, Any]) -> str:
    """What ROPO (rho=auto) estimated and dropped after round 1, the set its restarted last
    round trained without."""
    first = run["rounds"][0]
    flipped = first["n_flipped"] / first["n_pairs"]
    return (
        f"{run['label']}: after round 1 it estimated {_fmt(first.get('noise_estimate'))} of the "
        f"pairs flipped (truly flipped: {flipped:.3f}) and dropped {first['n_dropped']} of "
        f"{first['n_pairs']}, {_fmt(first['drop_precision'])} of them flipped, holding "
        f"{_fmt(first['drop_recall'])} of all flips; its last round trained DPO from the SFT "
        "model on the rest."
    )


def sweep_findings(sweep: dict[str, Any]) -> list[str]:
    """Per flip rate, which methods beat DPO with 95% confidence, which lost to it, and which
    the sweep cannot tell apart from it."""
    lines = []
    for noise in sorted({c["noise"] for c in sweep["statistics"]}):
        groups: dict[str, list[str]] = {
            "ahead of DPO with 95% confidence": [],
            "behind DPO with 95% confidence": [],
            "no clear difference from DPO": [],
        }
        for cell in sweep["statistics"]:
            interval = cell["vs_dpo"]
            if cell["noise"] != noise or interval is None:
                continue
            group = "no clear difference from DPO"
            if interval["low"] > 0:
                group = "ahead of DPO with 95% confidence"
            elif interval["high"] < 0:
                group = "behind DPO with 95% confidence"
            name = sweep_label(sweep, cell["method"])
            groups[group].append(f"{name} ({interval['estimate']:+.3f})")
        said = [f"{group}: {', '.join(names)}" for group, names in groups.items() if names]
        if said:
            lines.append(f"η = {noise:g}: " + "; ".join(said) + ".")
    return lines
