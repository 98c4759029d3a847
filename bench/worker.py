"""One side of the benchmark in a process of its own, so that its peak memory is its own.

    python bench/worker.py {trl,dpo,ropo} MODEL_DIR [--variant mha] [--warmup 1] [--steps 4]
                           [--threads N] [--keep-freed-memory]

Builds the side exactly as bench_step.py does (TRL: trainer with precomputed reference; ours:
reference cache, policy, AdamW), takes a few steps and prints one JSON line: peak resident memory
of the whole process and of the training phase, and the seconds of each timed step.
Only the TRL side imports transformers, TRL and datasets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fixtures import BETA, VARIANTS, Workload, make_pairs, step_batches, vocab_of, workload_of


def memory_mb() -> dict[str, float]:
    """Resident memory now (VmRSS) and its peak since start or reset (VmHWM), in MiB.

    Not ru_maxrss: Linux carries that over from the parent process through fork and exec.
    """
    status = Path("/proc/self/status").read_text()
    found = {key: re.search(rf"{key}:\s+(\d+)", status) for key in ("VmRSS", "VmHWM")}
    return {key: int(match.group(1)) / 1024 for key, match in found.items()}


def reset_peak() -> None:
    """Restart the VmHWM high-water mark at the current RSS (Linux /proc/PID/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(step: Callable[[int], Any], warmup: int, steps: int) -> dict[str, Any]:
    """Memory before training, then `warmup` untimed and `steps` timed steps."""
    setup = memory_mb()
    reset_peak()
    for k in range(warmup):
        step(k)
    seconds = []
    for k in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(k)
        seconds.append(time.perf_counter() - start)
    train = memory_mb()["VmHWM"]
    return {
        "step_seconds": seconds,
        "peak_rss_mb": max(setup["VmHWM"], train),
        "setup_peak_mb": setup["VmHWM"],
        "train_peak_mb": train,
        "train_extra_mb": train - setup["VmRSS"],  # gradients, AdamW moments, activations
    }


def trl_stepper(model_dir: Path, workload: Workload, vocab: int) -> Callable[[int], Any]:
    from trl_side import build_trainer, trl_examples, trl_step

    pairs = make_pairs(workload, vocab)
    trainer = build_trainer(model_dir, pairs, workload)
    examples = trl_examples(trainer, pairs)
    size = workload.pairs_per_step
    batches = [examples[s : s + size] for s in range(0, len(examples), size)]
    return lambda k: trl_step(trainer, batches[k % len(batches)])


def our_stepper(
    model_dir: Path, workload: Workload, vocab: int, loss_name: str
) -> Callable[[int], Any]:
    from our_side import build_ours, our_step

    from ropo.loss import get_loss

    pairs = make_pairs(workload, vocab)
    cache_dir = Path(tempfile.mkdtemp(prefix="ropo-bench-cache-"))
    side = build_ours(model_dir, pairs, cache_dir, workload.pairs_per_step)
    loss_fn = get_loss(loss_name, beta=BETA)
    batches = step_batches(pairs, workload.pairs_per_step)
    return lambda k: our_step(side, loss_fn, batches[k % len(batches)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=("trl", "dpo", "ropo"))
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--variant", choices=list(VARIANTS), default="mha", help="its workload")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc malloc as `ropo` sets it"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from ropo.allocator import keep_freed_memory

        keep_freed_memory()
    workload, vocab = workload_of(args.variant), vocab_of(args.variant)
    if args.side == "trl":
        step = trl_stepper(args.model_dir, workload, vocab)
    else:
        step = our_stepper(args.model_dir, workload, vocab, args.side)
    result = measure(step, args.warmup, args.steps)
    modules = sorted(m for m in ("transformers", "trl", "datasets") if m in sys.modules)
    result |= {"side": args.side, "threads": torch.get_num_threads(), "imported": modules}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
