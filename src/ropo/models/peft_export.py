"""LoRA adapters in PEFT's layout, so `peft.PeftModel.from_pretrained(base, dir)` loads them.

`policy.save_final` writes them into `<out>/final/adapter` beside the merged weights. Our
adapters (lora.py) are PEFT's without any reshaping: lora_a (r, fan_in) is PEFT's lora_A.weight,
lora_b (fan_out, r) its lora_B.weight, the scale alpha / r its `scaling` (use_rslora=false), and
the projections are in Hugging Face's layout already (load.py renames, it never permutes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ropo.models.files import save_safetensors, write_atomic
from ropo.models.load import OURS_TO_HF, rename
from ropo.models.lora import ADAPTER_NAMES

PEFT_MATRIX = {"lora_a": "lora_A", "lora_b": "lora_B"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_name(name: str) -> str:
    """Our adapter name -> PEFT's: layers.0.attention.wq.lora_a ->
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    module, matrix = name.rsplit(".", 1)
    assert matrix in ADAPTER_NAMES, name
    hf_weight = rename(f"{module}.weight", OURS_TO_HF)
    assert hf_weight is not None, name
    return f"base_model.model.{hf_weight.removesuffix('.weight')}.{PEFT_MATRIX[matrix]}.weight"


def save_peft_adapters(
    path: Path, adapters: dict[str, torch.Tensor], rank: int, alpha: float, base_model: Path
) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `path`.

    `adapters`: our adapter tensors (lora_a and lora_b of every adapted projection), kept in the
    dtype they trained in (a few MB: no reason to round them). `base_model` is the frozen model
    they adapt, recorded as base_model_name_or_path.
    """
    tensors = {peft_name(name): t.detach().to("cpu").contiguous() for name, t in adapters.items()}
    modules = sorted({name.rsplit(".", 3)[-3] for name in tensors})  # q_proj, down_proj, ...
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model.resolve()),
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale alpha / r, as lora.py; rsLoRA would be alpha / sqrt(r)
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path / "adapter_model.safetensors",
        lambda tmp: save_safetensors(tensors, tmp, {"format": "pt"}),
    )
    write_atomic(path / "adapter_config.json", json.dumps(config, indent=2) + "\n")
