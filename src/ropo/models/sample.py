"""Batched autoregressive sampling with a KV cache: prompt token ids -> new token ids.

Used after training, by ROPO's rejection sampling (regenerating responses for prompts whose pairs
were filtered out). Prompts are left-padded so every row's next token sits in the last column.
"""

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ropo.models.llama import KVCache, Transformer

# Every SDPA backend but cuDNN's. cuDNN's builds an execution plan per key length, and decoding
# grows the key length by one each step: on an H100 that cost about 2 ms of CPU per layer per
# step, several times the step's GPU work. (CPU's kernel is FLASH_ATTENTION.)
DECODING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.inference_mode()
@sdpa_kernel(DECODING_BACKENDS)
def generate(
    model: Transformer,
    prompts_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (prompt excluded), at most max_new_tokens each.

    A row stops after emitting eos_id, which is kept. temperature 0 is greedy; otherwise nucleus
    sampling with top_p, drawn from `generator` (on the model's device) for reproducibility.
    `vocab_limit` (the tokenizer's size) keeps padded embedding rows from ever being sampled.
    """
    device = model.tok_embeddings.weight.device
    _check_arguments(prompts_ids, max_new_tokens, temperature, top_p, generator, device)
    if max_new_tokens == 0:
        return [[] for _ in prompts_ids]
    B, P = len(prompts_ids), max(len(p) for p in prompts_ids)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)  # (B, P)
    mask = torch.zeros(B, P, dtype=torch.long, device=device)  # (B, P)
    for row, prompt in enumerate(prompts_ids):
        input_ids[row, P - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, P - len(prompt) :] = 1
    # Left padding shifts the slots, so RoPE positions count real tokens only.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(model.config, B, P + max_new_tokens, dtype, device)
    logits = _last_logits(model, input_ids, mask, positions, cache)  # (B, V)
    next_position = mask.sum(-1, keepdim=True)  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        token = sample_token(logits, temperature, top_p, generator)  # (B,)
        token = token.masked_fill(finished, pad_id)
        new_tokens.append(token)
        if eos_id is not None:
            finished |= token == eos_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        ones = torch.ones(B, 1, dtype=torch.long, device=device)
        logits = _last_logits(model, token[:, None], ones, next_position, cache)  # (B, V)
        next_position = next_position + 1
    rows = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    return [_cut_after_eos(row, eos_id) for row in rows]


def _last_logits(
    model: Transformer, ids: Tensor, mask: Tensor, positions: Tensor, cache: KVCache
) -> Tensor:
    # The LM head at the last position only: the prefill's (B, P, V) logits would be a GB at 7B.
    return model.output(model.hidden_states(ids, mask, positions, cache)[:, -1])  # (B, V)


def sample_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax at temperature 0, else
    a draw from the smallest set of top tokens whose probability mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    # Drop a token when the tokens ranked above it already hold top_p; the top one always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1)
    return order.gather(-1, choice).squeeze(-1)


def _check_arguments(
    prompts_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> None:
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ValueError("generate needs at least one prompt, and every prompt needs a token")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} must be >= 0, temperature={temperature} >= 0 "
            f"and top_p={top_p} in (0, 1]"
        )
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}")


def _cut_after_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    if eos_id is None or eos_id not in tokens:
        return tokens
    return tokens[: tokens.index(eos_id) + 1]
