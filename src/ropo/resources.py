"""Device and dtype choice, a memory estimate and size checks made before any weight is loaded.

A 7B run that cannot fit should fail in a second with the arithmetic, not after minutes of
loading with an out-of-memory error from deep inside torch; so should a max_length beyond the
model's positions, a LoRA rank beyond its narrowest adapted projection, or a tokenizer with ids
the embedding lacks. Every check takes the ModelConfig its caller read once from config.json.
The estimate is per process: FSDP (torchrun) divides what it shards by the number of processes.

Notation: n parameters, C model width, M MLP width (intermediate_size), r LoRA rank, W processes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ropo.config import RunConfig
from ropo.models.config import ModelConfig
from ropo.models.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30


def pick_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config key 'device' = {name!r}, but torch sees no CUDA device")
    return device


# (fan_in, fan_out) of each projection LoRA can adapt, named by the config.json values behind them.
PROJECTION_SIDES = {
    "wq": ("hidden_size", "num_attention_heads * head_dim"),
    "wk": ("hidden_size", "num_key_value_heads * head_dim"),
    "wv": ("hidden_size", "num_key_value_heads * head_dim"),
    "wo": ("num_attention_heads * head_dim", "hidden_size"),
    "w1": ("hidden_size", "intermediate_size"),
    "w2": ("intermediate_size", "hidden_size"),
    "w3": ("hidden_size", "intermediate_size"),
}


def projection_widths(config: ModelConfig) -> dict[str, int]:
    """The value of every name in PROJECTION_SIDES for this model."""
    return {
        "hidden_size": config.dim,
        "num_attention_heads * head_dim": config.n_heads * config.head_dim,
        "num_key_value_heads * head_dim": config.n_kv_heads * config.head_dim,
        "intermediate_size": config.intermediate_size,
    }


def lora_params(config: ModelConfig, rank: int, targets: list[str]) -> int:
    """Adapter parameters: r * (fan_in + fan_out) for every target projection of every layer."""
    width = projection_widths(config)
    fans = sum(width[side] for name in targets for side in PROJECTION_SIDES[name])
    return config.n_layers * rank * fans


def check_vocab(tokenizer: Tokenizer, config: ModelConfig, model_dir: Path) -> None:
    """ValueError if the tokenizer has ids the embedding (of `model_dir`'s `config`) lacks."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{tokenizer.model_file} has {tokenizer.vocab_size} pieces but the "
            f"model's embedding has {config.vocab_size} rows "
            f"({model_dir}/config.json vocab_size): they do not belong together"
        )


def check_fits(config: ModelConfig, cfg: RunConfig, model_dir: Path) -> None:
    """ValueError unless max_length is within the model's max_position_embeddings and lora_rank
    within the narrowest side of every adapted projection (`config`, of `model_dir`)."""
    config_file = model_dir / "config.json"
    max_length, positions = cfg.data.max_length, config.max_position_embeddings
    if max_length > positions:
        raise ValueError(
            f"config key 'max_length' = {max_length} is more than the model's "
            f"max_position_embeddings = {positions} ({config_file}); set max_length <= {positions}"
        )
    rank, width = cfg.model.lora_rank, projection_widths(config)
    targets = cfg.model.lora_targets.split(",")
    narrowest = min((side for name in targets for side in PROJECTION_SIDES[name]), key=width.get)
    if rank > width[narrowest]:
        raise ValueError(
            f"config key 'lora_rank' = {rank} is more than the narrowest side of an adapted "
            f"projection, {narrowest} = {width[narrowest]} ({config_file}); "
            f"set lora_rank <= {width[narrowest]} or adapt other lora_targets"
        )


def activation_bytes(config: ModelConfig, tokens: int, width: int, checkpointing: bool) -> int:
    """Rough bytes kept for backward by a micro-batch of `tokens` tokens.

    A block keeps about 14 C + 5 M values per token (norm inputs and statistics, q/k/v, attention
    output, the three SwiGLU products); for Llama-2-7B that is 27 C. Checkpointing keeps only
    each block's input (C per token and layer) plus one block's worth while it is recomputed.
    """
    per_block = tokens * (14 * config.dim + 5 * config.intermediate_size) * width
    if checkpointing:
        return tokens * config.dim * config.n_layers * width + per_block
    return per_block * config.n_layers


def training_bytes(config: ModelConfig, cfg: RunConfig, world_size: int = 1) -> dict[str, int]:
    """Bytes per process by part: weights, gradients and AdamW's two moments (for the trained
    parameters only: all, or the LoRA adapters), activations, and under FSDP (W > 1) the
    unsharded working set. Weights, gradients and moments are sharded W ways.

    The reference model is not counted: its log-probs come from the cache.
    """
    model, width = cfg.model, BYTES_PER_VALUE[cfg.model.dtype]
    n_adapters = lora_params(config, model.lora_rank, model.lora_targets.split(","))
    n_base = config.num_params()
    n_trained = n_adapters if model.lora_rank else n_base
    shard = lambda n_bytes: math.ceil(n_bytes / world_size)
    parts = {
        "weights": shard((n_base + n_adapters) * width),
        "gradients": shard(n_trained * width),
        "adamw_moments": shard(2 * n_trained * width),
    }
    value_width = 2 if model.autocast == "bfloat16" else width
    pairs = math.ceil(cfg.optim.batch_size / world_size)  # each process's share of a micro-batch
    tokens = 2 * pairs * cfg.data.max_length  # chosen and rejected rows, padded at most this far
    parts["activations"] = activation_bytes(
        config, tokens, value_width, model.activation_checkpointing
    )
    if model.autocast == "bfloat16" and width > 2:  # bf16 copies of the weights kept for backward
        block = config.block_params()
        parts["autocast_copies"] = 2 * (block if model.activation_checkpointing else n_base)
    if world_size > 1:  # embeddings, head and about two blocks gathered at a time
        root = n_base - config.n_layers * config.block_params()
        parts["fsdp_unsharded"] = (root + 2 * config.block_params()) * width
    return parts


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(
    config: ModelConfig, cfg: RunConfig, device: torch.device, model_dir: Path, world_size: int = 1
) -> str:
    """The estimate as one line to print; MemoryError with the same arithmetic when the model
    (`config`, of `model_dir`) cannot be trained on `device` (per process, `world_size` of them)."""
    need = training_bytes(config, cfg, world_size)
    total, have = sum(need.values()), available_bytes(device)
    parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.items())
    where = f" per process ({world_size} processes)" if world_size > 1 else ""
    summary = (
        f"memory estimate{where}: {total / GiB:.1f} GiB ({parts} GiB); "
        f"{device} has {have / GiB:.1f} GiB free"
    )
    if total > have:
        raise MemoryError(
            f"{model_dir.name}: {summary}. Options: dtype=bfloat16, lora_rank=16, "
            f"activation_checkpointing=true, a smaller batch_size (more grad_accum keeps the "
            f"step), max_length, or more GPUs with torchrun (docs/scaling.md)."
        )
    return summary
