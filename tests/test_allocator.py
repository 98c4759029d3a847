"""allocator.keep_freed_memory: after it, a step that frees and reallocates large tensors stops
page-faulting; without it (or opted out) every step faults its large tensors in again. Each
case runs in a fresh interpreter, since the setting holds for the whole process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Twelve steps of a training step's large temporaries (48 MB each, above glibc's largest mmap
# threshold of 32 MB): logits, their log-softmax, a vocabulary-sized gradient.
STEPS = f"""
import json, resource, sys, torch
sys.path.insert(0, {str(SRC)!r})
from ropo.allocator import keep_freed_memory
reason = keep_freed_memory() if sys.argv[1] == "keep" else "not asked"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range(12):
    before = faults()
    logits = torch.ones(1024, 12288)
    logp = logits.log_softmax(-1)
    grad = torch.zeros(12288, 1024)
    float(logp[0, 0] + grad[0, 0])
    del logits, logp, grad
    per_step.append(faults() - before)
print(json.dumps({{"reason": reason, "faults": per_step}}))
"""

PAGES_PER_STEP = 3 * 48 * 2**20 // 4096  # the three tensors' 4 KiB pages


def steps(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | env,
    )
    return json.loads(out.stdout.splitlines()[-1])


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)


@glibc_only
def test_freed_memory_is_reused_without_page_faults() -> None:
    kept = steps("keep")
    assert kept["reason"] is None
    assert kept["faults"][0] > 0.9 * PAGES_PER_STEP  # the first step gets its pages
    assert sum(kept["faults"][-4:]) < 0.01 * PAGES_PER_STEP  # the last ones reuse them


@glibc_only
@pytest.mark.parametrize("how", ["not asked", "opted out", "GLIBC_TUNABLES"])
def test_without_the_setting_every_step_faults_again(how: str) -> None:
    env = {
        "not asked": {},
        "opted out": {"ROPO_KEEP_FREED_MEMORY": "0"},
        "GLIBC_TUNABLES": {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
    }[how]
    result = steps("plain" if how == "not asked" else "keep", **env)
    reason = {"not asked": "not asked", "opted out": "ROPO_KEEP_FREED_MEMORY=0"}
    assert result["reason"] == reason.get(how, "GLIBC_TUNABLES sets malloc already")
    assert all(f > 0.9 * PAGES_PER_STEP for f in result["faults"])
