"""Batched autoregressive sampling with a KV cache: prompt token ids -> new token ids.

Used after training, by ROPO's rejection sampling (regenerating responses for prompts whose pairs
were filtered out), and by `ropo generate`. Prompts are left-padded so every row's next token
sits in the last column. The cache and the cached forward pass live here, not in the model:
llama.py's forward keeps nothing between calls.

Notation: B rows, T new tokens of a call, S keys (cached + new), H query heads, K kv heads,
D head_dim, C model width, V vocab.
"""

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ropo.models.config import ModelConfig
from ropo.models.kernels import packed_for_decoding
from ropo.models.llama import Transformer, causal_mask

# Every SDPA backend but cuDNN's. cuDNN's builds an execution plan per key length, and decoding
# grows the key length by one each step: on an H100 that cost about 2 ms of CPU per layer per
# step, several times the step's GPU work. (CPU's kernel is FLASH_ATTENTION.)
DECODING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Keys and values of every layer for B rows of up to max_len tokens, as gpt-fast keeps them:
    allocated once at full length and written in place, so no step concatenates or reallocates.

    real_keys (B, max_len) is False at left padding; `length` is how many slots earlier calls
    filled. Attention reads the filled slots only.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.real_keys = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def add_tokens(self, real: Tensor) -> Tensor:
        """Record which of this call's T tokens (B, T) are real; return it for all S keys (B, S)."""
        end = self.length + real.shape[1]
        if end > self.real_keys.shape[1]:
            raise ValueError(f"KVCache has {self.real_keys.shape[1]} slots, {end} are needed")
        self.real_keys[:, self.length : end] = real
        return self.real_keys[:, :end]

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this call's k, v (B, K, T, D) after the filled slots; return all (B, K, S, D)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def cached_last_logits(
    model: Transformer, tokens: Tensor, positions: Tensor, real: Tensor, cache: KVCache
) -> Tensor:
    """Logits (B, V) at the last of tokens (B, T), which continue the rows held in `cache`.

    llama.py's Block.forward, with this call's keys and values written into the cache between
    the projections and attention. positions (B, T): RoPE positions; real (B, T): not padding.
    """
    real_keys = cache.add_tokens(real)  # (B, S)
    window = model.config.sliding_window
    unpadded_prompt = cache.length == 0 and (window is None or window >= real.shape[1])
    if unpadded_prompt and bool(real.all()):
        attn_mask = None  # plain causal attention: SDPA's is_causal, no (B, 1, T, T) mask to read
    else:
        attn_mask = causal_mask(real_keys, window, cache.length)
    x = model.tok_embeddings(tokens)  # (B, T, C)
    rope = model.rope(positions, x.dtype)
    for i, block in enumerate(model.layers):
        attention = block.attention
        q, k, v = attention.project(block.attention_norm(x), rope)  # (B, H, T, D), (B, K, T, D)
        k, v = cache.write(i, k, v)  # (B, K, S, D)
        x = x + attention.attend(q, k, v, attn_mask)  # (B, T, C)
        x = x + block.feed_forward(block.ffn_norm(x))
    cache.length += tokens.shape[1]
    # The LM head at the last position only: the prefill's (B, T, V) logits would be a GB at 7B.
    return model.output(model.norm(x)[:, -1])  # (B, V)


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
    real = torch.zeros(B, P, dtype=torch.bool, device=device)  # (B, P)
    for row, prompt in enumerate(prompts_ids):
        input_ids[row, P - len(prompt) :] = torch.tensor(prompt, device=device)
        real[row, P - len(prompt) :] = True
    # Left padding shifts the slots, so RoPE positions count real tokens only.
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(model.config, B, P + max_new_tokens, dtype, device)
    # Every decode step reads every weight: kernels.PackedLinear's blocked copies make those
    # reads faster on CPU (a no-op for llama.py's textbook modules).
    with packed_for_decoding(model, rows=B):
        logits = cached_last_logits(model, input_ids, positions, real, cache)  # (B, V)
        next_position = real.sum(-1, keepdim=True)  # (B, 1)
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
            real_token = torch.ones(B, 1, dtype=torch.bool, device=device)
            logits = cached_last_logits(model, token[:, None], next_position, real_token, cache)
            next_position = next_position + 1
    rows = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    return [_cut_after_eos(row, eos_id) for row in rows]


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
