"""Profile the two slow spots seen on the GPU: 7B sampling and the 1B training step.

    PYTHONPATH=src python3 bench/gpu_profile.py
Prints the top operators by CUDA and CPU time for each.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from gpu_measure import build, fake_ref, synthetic_pairs  # noqa: E402

from ropo.config import OptimSettings  # noqa: E402
from ropo.loss import get_loss  # noqa: E402
from ropo.models import generate  # noqa: E402
from ropo.step import StepSettings, make_optimizer, train_step  # noqa: E402


def profile_sampling() -> None:
    model = build("7b", torch.bfloat16, False).eval()
    pairs = synthetic_pairs(64, 256, 256, model.config.vocab_size)
    prompts = [list(p.prompt_ids) for p in pairs]
    g = torch.Generator(device="cuda").manual_seed(0)
    generate(model, prompts[:2], max_new_tokens=2, generator=g)
    for new in (1, 17):
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=new, temperature=1.0, generator=g)
        torch.cuda.synchronize()
        print(f"generate 64 x {new} new tokens: {time.perf_counter() - start:.3f} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, prompts, max_new_tokens=9, temperature=1.0, generator=g)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
    del model
    torch.cuda.empty_cache()


def profile_step() -> None:
    model = build("1b", torch.float32, False)
    pairs = synthetic_pairs(8 * 6, 256, 256, model.config.vocab_size)
    ref = fake_ref(pairs)
    optimizer = make_optimizer(model, OptimSettings(lr=1e-6))
    settings = StepSettings(0, 1.0, torch.device("cuda"), torch.bfloat16)
    loss_fn = get_loss("ropo")
    for i in range(3):
        train_step(model, optimizer, [pairs[i * 8 : i * 8 + 8]], ref, loss_fn, 1e-6, settings)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3, 5):
            train_step(model, optimizer, [pairs[i * 8 : i * 8 + 8]], ref, loss_fn, 1e-6, settings)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    profile_sampling()
    profile_step()
