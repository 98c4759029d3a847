"""LoRA: train a low-rank update B @ A of chosen projections while the model's weights stay frozen.

Applied to a loaded Transformer before training (config key `lora_rank` > 0); merged back into the
plain weights before saving, so `<out>/final` is an ordinary Hugging Face checkpoint. Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models" (2021), eq. 3: h = W0 x + (alpha / r) B A x.

Shapes: r rank, `fan_in` input and `fan_out` output features of the adapted projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ropo.models.llama import Transformer

ADAPTER_NAMES = ("lora_a", "lora_b")
# The module that owns each target projection inside a Block.
TARGET_PARENTS = {
    "wq": "attention",
    "wk": "attention",
    "wv": "attention",
    "wo": "attention",
    "w1": "feed_forward",
    "w2": "feed_forward",
    "w3": "feed_forward",
}


class LoRALinear(nn.Module):
    """A frozen bias-free linear layer W (fan_out, fan_in) plus the trainable update
    scale * B (fan_out, r) @ A (r, fan_in).

    The frozen weight keeps the name `weight`, so parameter names (and Hugging Face renaming)
    are those of the plain model; the adapters add `lora_a` and `lora_b`. B starts at zero, so
    the layer starts out computing exactly what the plain one did.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        fan_out, fan_in = base.weight.shape
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        # A is drawn on the CPU from a seeded generator: every rank and every device gets the same
        # adapters. Kaiming-uniform with a = sqrt(5) is nn.Linear's own init (and peft's).
        lora_a = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(lora_a.to(**like))  # (r, fan_in)
        self.lora_b = nn.Parameter(torch.zeros(fan_out, rank, **like))  # (fan_out, r)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(x, self.lora_a), self.lora_b)  # (..., r) -> (..., fan_out)
        return F.linear(x, self.weight) + update * self.scale


def apply_lora(
    model: Transformer, rank: int, alpha: float, targets: Sequence[str], seed: int = 0
) -> Transformer:
    """Freeze every parameter of `model` and wrap each target projection of every block in a
    LoRALinear (in place); returns `model`. Only the adapters then require gradients."""
    unknown = set(targets) - set(TARGET_PARENTS)
    if unknown or rank < 1:
        raise ValueError(f"LoRA rank {rank} (must be >= 1) or unknown targets {sorted(unknown)}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.layers:
        for name in targets:
            parent = getattr(block, TARGET_PARENTS[name])
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, generator))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALinear) for module in model.modules())


def is_adapter(name: str) -> bool:
    """Whether a parameter name (ours) is a LoRA adapter, e.g. layers.0.attention.wq.lora_a."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """W + scale * B @ A, summed in float32 and returned in W's dtype, (fan_out, fan_in)."""
    update = lora_b.float() @ lora_a.float()  # (fan_out, r) @ (r, fan_in)
    return (weight.float() + scale * update).to(weight.dtype)


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight and put plain nn.Linear layers back (in place).

    The result has exactly the parameters of a model without LoRA, so `save_model` writes plain
    Hugging Face layout; its logits equal the unmerged model's up to rounding.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                fan_out, fan_in = child.weight.shape
                plain = nn.Linear(fan_in, fan_out, bias=False, device="meta")
                merged = merged_weight(child.weight, child.lora_a, child.lora_b, child.scale)
                plain.weight = nn.Parameter(merged)
                setattr(parent, name, plain)
    return model


def merged_weights(weights: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A state dict (our names) with adapters folded into their weights and dropped: what
    `merge_lora` does to a module, for weights gathered from several processes."""
    merged = {name: tensor for name, tensor in weights.items() if not is_adapter(name)}
    for name in weights:
        if name.endswith(".lora_a"):
            prefix = name.removesuffix(".lora_a")
            merged[f"{prefix}.weight"] = merged_weight(
                weights[f"{prefix}.weight"], weights[name], weights[f"{prefix}.lora_b"], scale
            )
    return merged
