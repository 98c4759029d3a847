"""The policy a training run trains: where its weights come from (checked before any is read),
built fresh (LoRA adapters, FSDP shards) or restored with its optimizer from a checkpoint, and
saved at the end in plain Hugging Face layout.

Sits after training_run.py, whose TrainingRun it reads; run_setup.py, train.py and sft.py
call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ropo import distributed
from ropo.checkpoint import load_adapters, load_checkpoint
from ropo.config import RunConfig
from ropo.distributed import is_main
from ropo.models import Tokenizer, load_model, load_tokenizer
from ropo.models.config import read_model_config
from ropo.models.export import write_tokenizer_files
from ropo.models.llama import Transformer
from ropo.models.load import checkpoint_dtype, save_weights
from ropo.models.lora import apply_lora, is_adapter, merged_weights
from ropo.models.peft_export import save_peft_adapters
from ropo.resources import DTYPES, check_fits, check_memory, check_vocab
from ropo.sft_config import SftConfig
from ropo.step import make_optimizer
from ropo.training_run import TrainingRun


def policy_tokenizer(
    cfg: RunConfig | SftConfig, model_dir: Path, device: torch.device
) -> Tokenizer:
    """The tokenizer of the policy's model directory, checked to belong to its weights, and the
    model checked to fit (positions, LoRA rank, memory on `device`) before any weight is read."""
    tokenizer = load_tokenizer(model_dir)
    config = read_model_config(model_dir)  # read once; these checks fail in a second
    check_vocab(tokenizer, config, model_dir)
    check_fits(config, cfg, model_dir)
    memory = check_memory(config, cfg, device, model_dir, distributed.world_size())
    if is_main():
        print(memory)
    return tokenizer


def build_policy(run: TrainingRun, checkpoint: Path | None = None) -> Transformer:
    """The policy to train: weights of the model directory or of `checkpoint`, LoRA adapters
    when lora_rank > 0 (a checkpoint then holds only them), sharded with FSDP under torchrun."""
    cfg = run.cfg.model
    source = checkpoint if checkpoint is not None and not cfg.lora_rank else run.model_dir
    policy = load_model(source, dtype=run.dtype, device=run.step.device)
    if cfg.lora_rank:
        targets = cfg.lora_targets.split(",")
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, targets, seed=run.cfg.run.seed)
        if checkpoint is not None:
            load_adapters(policy, checkpoint, run.base_sha256)
    policy.activation_checkpointing = cfg.activation_checkpointing
    policy.train()
    return distributed.shard_model(policy)


def policy_and_optimizer(
    run: TrainingRun,
) -> tuple[Transformer, torch.optim.Optimizer, dict[str, Any] | None]:
    """A fresh policy and AdamW with None, or the policy, AdamW and saved loop position (the
    record of training_run.LoopPosition.to_record) of the checkpoint the run resumes from."""
    optimizer_for = lambda model: make_optimizer(model, run.cfg.optim)  # noqa: E731
    checkpoint = run.identity.checkpoint
    if checkpoint is None:
        if run.cfg.run.resume and is_main():
            print(f"resume: no checkpoint in {run.out} yet, starting from the beginning")
        policy = build_policy(run)
        return policy, optimizer_for(policy), None
    policy, optimizer, saved = load_checkpoint(
        checkpoint, lambda path: build_policy(run, path), optimizer_for, run.step.device
    )
    return policy, optimizer, saved["loop"]


@dataclass
class Learner:
    """The policy being trained and its optimizer, held only here: last_round=restart replaces
    both, and the old ones are freed."""

    policy: Transformer
    optimizer: torch.optim.Optimizer

    def restart(self, run: TrainingRun) -> None:
        """A fresh policy from the model directory and a fresh AdamW in place of the old ones."""
        self.optimizer.state.clear()  # its moments go first: the old and new weights then fit
        self.policy = build_policy(run)
        self.optimizer = make_optimizer(self.policy, run.cfg.optim)


def save_final(run: TrainingRun, policy: Transformer) -> None:
    """<out>/final: the policy in plain Hugging Face layout (LoRA merged) in `save_dtype` (default:
    the input checkpoint's dtype), the tokenizer files that say how the run tokenised, and with
    LoRA the adapters in PEFT's layout in final/adapter (a subfolder: transformers would take an
    adapter_config.json in final/ itself for an adapter to load onto the base model)."""
    weights = distributed.gather_weights(policy)  # under FSDP every rank takes part
    if not is_main():
        return
    cfg, final = run.cfg.model, run.out / "final"
    if cfg.lora_rank:
        adapters = {name: w for name, w in weights.items() if is_adapter(name)}
        rank, alpha = cfg.lora_rank, cfg.lora_alpha
        save_peft_adapters(final / "adapter", adapters, rank, alpha, run.model_dir)
        weights = merged_weights(weights, alpha / rank)
    dtype = DTYPES[cfg.save_dtype] if cfg.save_dtype else checkpoint_dtype(run.model_dir)
    # Cast on the way to the CPU, one tensor at a time: no second copy of the model on the GPU.
    save_weights(policy.config, {name: w.to("cpu", dtype) for name, w in weights.items()}, final)
    write_tokenizer_files(final, run.tokenizer_files, policy.config.max_position_embeddings)
