"""Stage 2 of the built-in pipeline: a tiny Llama trained from scratch on the task demonstrations.

In: the task's prompts and demonstrations and the tokenizer trained on them. Out: an HF-layout
model directory (config.json, model.safetensors, tokenizer.model): the SFT model that samples the
preference pairs and serves as the frozen reference of every preference run.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import torch

from ropo.logps import collate_sequences, sequence_logps
from ropo.models import ModelConfig, Tokenizer, Transformer, save_model
from ropo.progress import progress_bar


def tiny_llama_config(
    tokenizer: Tokenizer, dim: int, n_layers: int, n_heads: int, max_positions: int = 64
) -> ModelConfig:
    """A Llama config sized for the task. The vocabulary is exactly the tokenizer's: a padded
    embedding could sample ids that sentencepiece cannot decode."""
    if dim % n_heads != 0:
        raise ValueError(f"dim={dim} is not a multiple of n_heads={n_heads}")
    return ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=dim // n_heads,
        intermediate_size=4 * dim,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=max_positions,
        sliding_window=None,
        tie_word_embeddings=False,
        architecture="LlamaForCausalLM",
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )


def response_nll(
    model: Transformer, prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Mean negative log-likelihood per response token over the batch (a scalar)."""
    input_ids, attention_mask, response_mask = collate_sequences(prompts, responses, pad_id)
    sums, counts = sequence_logps(model, input_ids, attention_mask, response_mask)
    return -sums.sum() / counts.sum()


def train_sft(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    responses: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> list[float]:
    """AdamW on the response NLL, warm-up then cosine decay; returns the loss of every step.

    Batches are drawn by a seeded shuffle that repeats over the demonstrations, so the model
    sees each one about steps * batch_size / N times.
    """
    examples = [
        tokenizer.encode_prompt_response(p, r) for p, r in zip(prompts, responses, strict=True)
    ]
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    losses = []
    model.train()
    for step in (bar := progress_bar(range(steps), desc="sft", unit="step")):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        for group in optimizer.param_groups:
            cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * min((step + 1) / warmup, cosine)
        loss = response_nll(model, [p for p, _ in batch], [r for _, r in batch], tokenizer.pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(nll=f"{loss.item():.3f}")
    return losses


def save_sft(model: Transformer, tokenizer: Tokenizer, out_dir: Path) -> None:
    """Weights, config.json and tokenizer.model together: a model directory `ropo train` reads."""
    save_model(model, out_dir)
    shutil.copy(tokenizer.model_file, out_dir / "tokenizer.model")
