"""Device choice and a memory estimate made before any weight is loaded.

A 7B run that cannot fit should fail in a second with the arithmetic, not after minutes of
loading with an out-of-memory error from deep inside torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ropo.models.llama import ModelConfig


def pick_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config key 'device' = {name!r}, but torch sees no CUDA device")
    return device


def training_bytes(config: ModelConfig, dtype: torch.dtype) -> dict[str, int]:
    """Bytes for weights, gradients and AdamW's two moments (full fine-tuning, one process).

    Activations come on top and depend on batch and length; the reference model is not counted
    because its log-probs come from the cache.
    """
    n = config.num_params()
    width = torch.finfo(dtype).bits // 8
    return {"weights": n * width, "gradients": n * width, "adamw_moments": 2 * n * width}


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(
    model_dir: Path, dtype: torch.dtype, device: torch.device, activation_checkpointing: bool
) -> None:
    """Raise MemoryError with the estimate when the model cannot be trained on `device`."""
    config = ModelConfig.from_hf(
        json.loads((model_dir / "config.json").read_text()), source=str(model_dir / "config.json")
    )
    need = training_bytes(config, dtype)
    total = sum(need.values())
    have = available_bytes(device)
    if total > have:
        parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in need.items())
        hint = "" if activation_checkpointing else " (activations not counted)"
        raise MemoryError(
            f"{model_dir.name}: training needs about {total / 2**30:.1f} GiB ({parts}){hint} but "
            f"{device} has {have / 2**30:.1f} GiB free. Use dtype=bfloat16, a bigger device, or "
            f"several GPUs."
        )
