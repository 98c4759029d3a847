"""`make bench`: TRL's DPOTrainer against our DPO and ROPO steps, same model, same tokens, same run.

For each model variant (the toy MHA and GQA shapes, and SmolLM2-135M's shape):
  1. guard   both sides built from one checkpoint must agree on log-probs, losses and weights;
  2. timing  in this process, the sides take steps in turn (the order rotates every step),
             so a burst of load from elsewhere on the machine hits all of them alike;
  3. memory  each side again in a fresh subprocess (worker.py), for a clean peak RSS;
  4. round   the extra work of a ROPO round against a training epoch (toy shapes).
Then batched greedy decoding at SmolLM2's shape, ours against transformers' generate
(decoding.py). Writes bench/results.json and prints a table. bench/README.md says what is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from decoding import DecodeWorkload, run_decoding
from fixtures import (
    BETA,
    VARIANTS,
    WORKLOADS,
    Workload,
    cpu_seconds,
    make_pairs,
    matmul_peak,
    model_flops_per_step,
    step_batches,
    vocab_of,
    workload_of,
    write_model,
)
from guard import run_guard
from our_side import OurSide, build_ours, our_step, reference
from parity import as_records
from report import decoding_targets, machine, print_decoding, print_table, targets
from trl_side import build_trainer, trl_examples, trl_step

from ropo.allocator import keep_freed_memory
from ropo.logps_fused import score_pairs
from ropo.loss import get_loss

HERE = Path(__file__).resolve().parent
SIDES = ("trl", "dpo", "ropo")
DECODING_MODEL = "smollm2"  # the variant whose checkpoint the decoding benchmark loads


@dataclass(frozen=True)
class Plan:
    """How one variant is timed: its sides, untimed and timed steps, and its ROPO round."""

    sides: tuple[str, ...]
    warmup: int  # untimed steps per side, after the guard's two
    repeats: int  # timed epochs at most
    seconds: float  # budget of its timed epochs: past it, no further epoch starts
    ropo_round: bool  # a ROPO round's extra work after each epoch
    worker_steps: tuple[int, int]  # the memory worker's untimed and timed steps
    keep_freed_memory: bool  # --malloc keep: workers set malloc as the bench process did


def plan_of(name: str, args: argparse.Namespace) -> Plan:
    """The toy shapes: every side, --repeats epochs in their share of --budget. A real shape
    (a TRL step of half a minute on 2 cores): TRL and our DPO step, --real-repeats epochs; the
    guard's two steps per side are its warm-up, and a ROPO step costs what a DPO step does."""
    keep = args.malloc == "keep"
    if name in WORKLOADS:
        return Plan(("trl", "dpo"), 0, args.real_repeats, float("inf"), False, (1, 1), keep)
    toys = [v for v in args.variants if v not in WORKLOADS]
    return Plan(SIDES, args.warmup, args.repeats, args.budget / len(toys), True, (1, 4), keep)


def alternate_epoch(steps: dict[str, Callable[[int], float]], n_batches: int) -> dict:
    """Seconds of each side's steps over one epoch; the sides take turns, the order rotating."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for k in range(n_batches):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            steps[name](k)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def round_cost(side: OurSide, model_dir: Path, pairs: list, size: int, cache: Path) -> dict:
    """Seconds of a ROPO round's extra work: scoring all pairs, the reference (uncached, cached)."""
    start = time.perf_counter()
    score_pairs(side.model, pairs, 2 * size, side.settings.pad_id, desc="bench scoring")
    score = time.perf_counter() - start
    miss = reference(model_dir, pairs, cache, 2 * size)[1]  # a fresh directory: computed, written
    hit = reference(model_dir, pairs, cache, 2 * size)[1]  # read back
    return {"score_s": score, "ref_miss_s": miss, "ref_hit_s": hit}


def time_variant(model_dir: Path, workload: Workload, plan: Plan, tmp: Path) -> dict:
    """Guard, then epochs of alternating steps, each followed by one ROPO round's extra work
    where the plan has one.

    Measuring the round right after the epoch it is compared with keeps their ratio fair when
    the load on the machine drifts. One matmul-peak sample per epoch, too.
    """
    pairs, size = make_pairs(workload, vocab_of(model_dir.name)), workload.pairs_per_step
    dpo = build_ours(model_dir, pairs, tmp / "cache", size)
    trainer = build_trainer(model_dir, pairs, workload)
    checks = run_guard(dpo, trainer, pairs, size)
    batches = step_batches(pairs, size)
    examples = trl_examples(trainer, pairs)
    trl_batches = [examples[s : s + size] for s in range(0, len(examples), size)]
    dpo_loss = get_loss("dpo", beta=BETA)
    steps = {
        "trl": lambda k: trl_step(trainer, trl_batches[k])[0],
        "dpo": lambda k: our_step(dpo, dpo_loss, batches[k]).loss,
    }
    if "ropo" in plan.sides:
        ropo = build_ours(model_dir, pairs, tmp / "cache", size)
        ropo_loss = get_loss("ropo", beta=BETA)
        steps["ropo"] = lambda k: our_step(ropo, ropo_loss, batches[k]).loss
    for step in steps.values():
        for k in range(plan.warmup):
            step(k % len(batches))
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    rounds, peaks = [], []
    deadline = time.perf_counter() + plan.seconds
    for r in range(plan.repeats):
        if r > 0 and time.perf_counter() > deadline:
            break  # a machine busy with other work: fewer epochs rather than no result
        (machine, own), start = cpu_seconds(), time.perf_counter()
        epoch = alternate_epoch(steps, len(batches))
        for name, values in epoch.items():
            seconds[name] += values
        cost, ours = {}, "dpo"
        if plan.ropo_round:
            cost, ours = round_cost(ropo, model_dir, pairs, size, tmp / f"fresh-cache-{r}"), "ropo"
        machine_now, own_now = cpu_seconds()
        others = (machine_now - machine - (own_now - own)) / (time.perf_counter() - start)
        rounds.append(cost | {"epoch_s": sum(epoch[ours]), "other_processes_cores": others})
        peaks.append(matmul_peak(seconds=1.0))
    return {"guard": as_records(checks), "step_seconds": seconds, "rounds": rounds, "peaks": peaks}


def isolated_run(side: str, model_dir: Path, plan: Plan) -> dict:
    """worker.py in a fresh process: its own peak RSS and its own step times."""
    command = [sys.executable, str(HERE / "worker.py"), side, str(model_dir)]
    warmup, steps = plan.worker_steps
    command += ["--threads", str(torch.get_num_threads()), "--variant", model_dir.name]
    command += ["--warmup", str(warmup), "--steps", str(steps)]
    command += ["--keep-freed-memory"] if plan.keep_freed_memory else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(timed: dict, isolated: dict, flops: dict, peak: float, workload: Workload) -> dict:
    """Medians, throughput, MFU, memory and the ratios against TRL for one variant.

    `flops` is each side's FLOPs per step in its own layout, so MFU never credits a side for work
    it skips; tokens/s counts the same 2 x pairs x (prompt + response) tokens for every side.
    """
    sides = {}
    for side, step_seconds in timed["step_seconds"].items():
        seconds = statistics.median(step_seconds)
        sides[side] = {
            "seconds_per_step": seconds,
            "tokens_per_s": workload.tokens_per_step / seconds,
            "model_gflops_per_step": flops[side] / 1e9,
            "mfu": flops[side] / seconds / peak,
            "peak_rss_mb": isolated[side]["peak_rss_mb"],
            "train_phase_peak_mb": isolated[side]["train_peak_mb"],
            "train_phase_growth_mb": isolated[side]["train_extra_mb"],
            "isolated_seconds_per_step": statistics.median(isolated[side]["step_seconds"]),
            "steps_timed": len(step_seconds),
        }
    ratios = {
        f"{side}_{key}_vs_trl": sides[side][key] / sides["trl"][key]
        for side in sides
        if side != "trl"
        for key in ("tokens_per_s", "peak_rss_mb", "train_phase_growth_mb")
    }
    return {
        "guard_ok": all(check["ok"] for check in timed["guard"]),
        "guard": timed["guard"],
        "workload": vars(workload) | {"tokens_per_step": workload.tokens_per_step},
        "sides": sides,
        "ratios": ratios,
        "round": summarize_rounds(timed["rounds"]),
        "rounds": timed["rounds"],
        "wall_seconds": timed["wall_seconds"],
    }


def summarize_rounds(rounds: list[dict]) -> dict:
    """Medians over the epochs; without ROPO rounds timed, the epoch and the machine's load only."""
    median = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    round_ = {key: median(key) for key in rounds[0]}
    if "score_s" not in round_:
        return round_
    round_["extra_work_vs_epoch"] = statistics.median(
        (r["score_s"] + r["ref_hit_s"]) / r["epoch_s"] for r in rounds
    )
    round_["score_vs_epoch"] = statistics.median(r["score_s"] / r["epoch_s"] for r in rounds)
    round_["ref_hit_vs_miss"] = statistics.median(r["ref_hit_s"] / r["ref_miss_s"] for r in rounds)
    return round_


def measure_variant(name: str, args: argparse.Namespace, tmp: Path) -> tuple[Path, dict]:
    """Write the variant's checkpoint, time it, run its memory workers; the inputs of summarize."""
    plan, workload = plan_of(name, args), workload_of(name)
    start = time.perf_counter()
    model_dir = write_model(tmp / name, name)
    timed = time_variant(model_dir, workload, plan, tmp / f"{name}-work")
    in_process = time.perf_counter()
    isolated = {side: isolated_run(side, model_dir, plan) for side in plan.sides}
    # where make bench's minutes go: checkpoint, guard and timed epochs; then the memory workers
    timed["wall_seconds"] = {
        "in_process": in_process - start,
        "memory_workers": time.perf_counter() - in_process,
    }
    standard = model_flops_per_step(model_dir, workload, shared_prompt=False)
    shared = model_flops_per_step(model_dir, workload, shared_prompt=True)
    flops = {"trl": standard, "dpo": shared, "ropo": shared}
    return model_dir, {"timed": timed, "isolated": isolated, "flops": flops, "workload": workload}


def decode_under_watch(model_dir: Path, repeats: int) -> dict:
    """The decoding benchmark, and how many cores other processes kept busy meanwhile."""
    (machine_start, own_start), start = cpu_seconds(), time.perf_counter()
    decoding = run_decoding(model_dir, DecodeWorkload(), repeats)
    machine_now, own_now = cpu_seconds()
    others = machine_now - machine_start - (own_now - own_start)
    wall = time.perf_counter() - start
    return decoding | {"other_processes_cores": others / wall, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per side (toys)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (toys)")
    parser.add_argument("--real-repeats", type=int, default=1, help="timed epochs, real shapes")
    parser.add_argument("--decode-repeats", type=int, default=3, help="timed decodes per side")
    parser.add_argument("--skip-decoding", action="store_true", help="training steps only")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="none: decoding only",
    )
    parser.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="keep: every side in glibc's malloc setting of the `ropo` command (allocator.py)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--budget", type=float, default=360, help="seconds for the timed epochs of the toys"
    )
    args = parser.parse_args(argv)
    # Both sides always run under one malloc setting. By default, the one a plain Python
    # process gets; --malloc keep: the `ropo` command's (allocator.py), for TRL's steps too.
    malloc_note = keep_freed_memory() if args.malloc == "keep" else "not asked"
    # Progress bars of datasets, TRL and our scoring passes would bury the table.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    start = time.perf_counter()
    peaks, measured, decoding = [matmul_peak()], {}, None
    with tempfile.TemporaryDirectory(prefix="ropo-bench-") as tmp:
        model_dirs = {}
        for name in args.variants:
            model_dirs[name], measured[name] = measure_variant(name, args, Path(tmp))
            peaks += measured[name]["timed"]["peaks"]
        if not args.skip_decoding:
            model_dir = model_dirs.get(DECODING_MODEL) or write_model(
                Path(tmp) / DECODING_MODEL, DECODING_MODEL
            )
            decoding = decode_under_watch(model_dir, args.decode_repeats)
    peak = max(peaks) * 1e9  # the best sample: load from elsewhere only ever lowers a sample
    variants = {name: summarize(**m, peak=peak) for name, m in measured.items()}
    results = {
        "machine": machine(peaks)
        | {"malloc": "keeps freed memory" if malloc_note is None else f"default ({malloc_note})"},
        "workload": vars(Workload()) | {"tokens_per_step": Workload().tokens_per_step},
        "variants": variants,
        "targets": targets(variants),
    }
    if decoding is not None:
        results["decoding"] = decoding | {"targets": decoding_targets(decoding)}
    results["wall_seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if variants:
        print_table(results)
    print_decoding(results.get("decoding"))
    parts = [f"{n} {sum(v['wall_seconds'].values()):.0f} s" for n, v in variants.items()]
    parts += [f"decoding {decoding['wall_seconds']:.0f} s"] if decoding else []
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s: {', '.join(parts)})")
    guards_ok = all(v["guard_ok"] for v in variants.values())
    return 0 if guards_ok and (decoding is None or decoding["same_tokens"]) else 1


if __name__ == "__main__":
    sys.exit(main())
