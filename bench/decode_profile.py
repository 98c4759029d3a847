"""What one decode step of our sampler does, at SmolLM2's shape: ops, allocations, time per op.

    PYTHONPATH=src:bench python bench/decode_profile.py [--steps 8] [--batch 8]

Not part of `make bench`; a tool for whoever speeds up models/sample.py. It goes through the
public `generate` only, so it survives changes inside the sampler: everything is measured for
generate with 1 + steps new tokens minus generate with 1 (the prompt pass alone), per step.
Prints (1) the ops torch dispatches per step, by source line of ropo, with the bytes of the new
tensors they allocate, and (2) torch.profiler's self CPU time per op, kernels' inner ops included.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import traceback
from pathlib import Path

import torch
from decoding import DecodeWorkload, make_prompts
from fixtures import write_model
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from ropo.models import Transformer, generate, load_model


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops by (op, innermost ropo source line), and the bytes they allocate."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        frames = [f for f in traceback.extract_stack() if "/ropo/" in f.filename]
        line = f"{frames[-1].filename.split('/ropo/')[-1]}:{frames[-1].lineno}" if frames else "?"
        key = (func.overloadpacket.__name__, line)
        self.calls[key] += 1
        if isinstance(out, torch.Tensor) and not (func.is_view or func._schema.is_mutable):
            self.bytes[key] += out.numel() * out.element_size()  # a fresh tensor
            self.allocations += 1
        return out


def per_step(model: Transformer, prompts: list[list[int]], steps: int) -> None:
    """Ops and allocations of one decode step, by source line, most frequent first."""
    counters = []
    for n in (1, 1 + steps):
        with OpCounter() as counter:
            generate(model, prompts, n, temperature=0)
        counters.append(counter)
    prompt_only, full = counters
    calls = {k: (full.calls[k] - prompt_only.calls[k]) / steps for k in full.calls}
    megabytes = (sum(full.bytes.values()) - sum(prompt_only.bytes.values())) / steps / 1e6
    fresh = (full.allocations - prompt_only.allocations) / steps
    ops = sum(calls.values())
    print(f"per decode step: {ops:.0f} ops, {fresh:.0f} new tensors of {megabytes:.1f} MB in all")
    for (op, line), count in sorted(calls.items(), key=lambda kv: -kv[1])[:40]:
        allocated = (full.bytes[(op, line)] - prompt_only.bytes[(op, line)]) / steps
        print(f"{count:7.1f} {op:30} {allocated / 1e3:9.1f} kB  {line}")


def profiled(model: Transformer, prompts: list[list[int]], steps: int) -> None:
    """torch.profiler's self CPU time per op and decode step (the profiler's own cost included)."""
    tables = []
    for n in (1, 1 + steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, prompts, n, temperature=0)
        tables.append({e.key: e for e in prof.key_averages()})
    prompt_only, full = tables
    rows = []
    for key, event in full.items():
        base = prompt_only.get(key)
        count = event.count - (base.count if base else 0)
        micros = event.self_cpu_time_total - (base.self_cpu_time_total if base else 0)
        rows.append((micros / steps, count / steps, key))
    print(f"\nself CPU per decode step: {sum(r[0] for r in rows) / 1e3:.1f} ms (profiled)")
    for micros, count, key in sorted(rows, reverse=True)[:25]:
        print(f"{micros / 1e3:9.2f} ms {count:7.1f} calls  {key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="decode steps to average over")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ropo-decode-profile-") as tmp:
        model_dir = write_model(Path(tmp) / "smollm2", "smollm2")
        model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
        workload = DecodeWorkload(batch=args.batch)
        prompts = make_prompts(workload, model.config.vocab_size, model.config.bos_token_id or 1)
        generate(model, prompts, 4, temperature=0)  # warm-up
        per_step(model, prompts, args.steps)
        profiled(model, prompts, args.steps)


if __name__ == "__main__":
    main()
