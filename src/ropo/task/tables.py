"""Report stage, the text: results.json and sweep_results.json as Markdown tables and as plain
sentences comparing the methods. The pipeline prints the tables; report.py puts it all in report.md.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


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
