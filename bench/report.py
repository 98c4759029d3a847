"""The results of `make bench`: targets met or missed, the printed table, the machine."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

BUSY_CORES = 0.25  # other processes' load above which the table carries a warning
# The targets on a 2-core CPU: ours/TRL tokens/s, MFU, ours/TRL peak RSS, round/epoch.
TARGETS = {"dpo_speedup": 2.0, "mfu": 0.75, "memory_ratio": 0.75, "round_ratio": 0.35}
AT_LEAST = {"dpo_speedup", "mfu"}  # the others are upper bounds


def targets(variants: dict) -> dict[str, dict[str, Any]]:
    """Each target of the issue, per variant: the value reached and whether it is met."""
    out = {}
    for name, v in variants.items():
        values = {
            "dpo_speedup": v["ratios"]["dpo_tokens_per_s_vs_trl"],
            "mfu": v["sides"]["dpo"]["mfu"],
            "memory_ratio": v["ratios"]["dpo_peak_rss_mb_vs_trl"],
            "round_ratio": v["round"]["extra_work_vs_epoch"],
        }
        out[name] = {}
        for key, value in values.items():
            target = TARGETS[key]
            met = value >= target if key in AT_LEAST else value <= target
            out[name][key] = {"value": value, "target": target, "met": met}
    return out


def print_table(results: dict) -> None:
    peak = results["machine"]["fp32_matmul_peak_gflops"]
    print(f"\nfp32 matmul peak (best of torch.mm 2048^3): {peak:.0f} GFLOP/s")
    header = ("model", "side", " s/step", "  tok/s", "  MFU", " peak RSS", "train +MB")
    print(" ".join(header))
    for name, v in results["variants"].items():
        for side, s in v["sides"].items():
            print(
                f"{name:5} {side:5} {s['seconds_per_step']:7.3f} {s['tokens_per_s']:7.0f} "
                f"{s['mfu']:5.0%} {s['peak_rss_mb']:8.0f}M {s['train_phase_growth_mb']:8.0f}M"
            )
        r, rd = v["ratios"], v["round"]
        print(
            f"      ours/TRL: DPO tokens/s x{r['dpo_tokens_per_s_vs_trl']:.2f}, ROPO x"
            f"{r['ropo_tokens_per_s_vs_trl']:.2f}; DPO peak RSS x{r['dpo_peak_rss_mb_vs_trl']:.2f}"
            f"; guard {'ok' if v['guard_ok'] else 'FAILED'}"
        )
        print(
            f"      ROPO round: scoring {rd['score_s']:.2f}s + cached reference "
            f"{rd['ref_hit_s']:.3f}s (uncached {rd['ref_miss_s']:.2f}s) = "
            f"{rd['extra_work_vs_epoch']:.2f} x epoch ({rd['epoch_s']:.2f}s)"
        )
        busy = rd["other_processes_cores"]
        if busy > BUSY_CORES:
            print(
                f"      WARNING: other processes kept {busy:.1f} cores busy during the timed "
                "epochs (median): these numbers are not those of an idle machine"
            )
    for name, per in results["targets"].items():
        line = ", ".join(
            f"{k} {t['value']:.2f} {'met' if t['met'] else 'MISSED'}" for k, t in per.items()
        )
        print(f"targets {name}: {line}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def machine(peaks: list[float]) -> dict[str, Any]:
    import transformers
    import trl

    return {
        "cpu": cpu_name(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "fp32_matmul_peak_gflops": max(peaks),
        "fp32_matmul_peak_samples_gflops": peaks,
    }
