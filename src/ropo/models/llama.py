"""The Llama/Mistral decoder: token ids (B, T) -> logits (B, T, V) for every position.

Built from a ModelConfig (models/config.py); load.py fills in the weights and swaps in the faster
variants of models/kernels.py, which compute the same numbers. The log-prob code calls the model
on right-padded batches; sample.py runs the same modules with a KV cache of its own.
Mistral = Llama + a sliding window in the attention mask.

Notation: B batch, T tokens (queries), S keys, H query heads, K kv heads, D head_dim,
C model width, V vocab.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ropo.models.config import ModelConfig


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dim. The statistics run in fp32 and the
    result is cast back to x's dtype before the weight multiplies it (Hugging Face's order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


@dataclass
class Rope:
    """The RoPE angles of one batch's positions, shared by every layer: cos, sin (B, T, 1, D)."""

    cos: Tensor
    sin: Tensor

    def rotate(self, x: Tensor) -> Tensor:
        """x (B, T, heads, D), each head turned by its position: dim j pairs with dim j + D/2."""
        x1, x2 = x.chunk(2, dim=-1)  # (B, T, heads, D/2) each
        return x * self.cos + torch.cat((-x2, x1), dim=-1) * self.sin  # rotate-half


class RotaryEmbedding(nn.Module):
    """RoPE in the half-split layout of Hugging Face checkpoints: dims j and j + D/2 of a head
    turn together by the angle position * theta^(-2j/D). No parameters."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def angles(self, positions: Tensor) -> Tensor:
        """position * theta^(-2j/D) in fp32, (B, T, D/2), for integer positions (B, T)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
        inv_freq = (1.0 / self.theta**exponents).to(positions.device)  # (D/2,), on CPU as in HF
        return positions[..., None].float() * inv_freq  # (B, T, D/2)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> Rope:
        """cos and sin of the angles at integer positions (B, T), cast to dtype."""
        half = self.angles(positions)  # (B, T, D/2)
        angles = torch.cat((half, half), dim=-1)[:, :, None]  # (B, T, 1, D)
        return Rope(angles.cos().to(dtype), angles.sin().to(dtype))


def causal_mask(real_keys: Tensor, sliding_window: int | None, q_start: int = 0) -> Tensor:
    """attn_mask (B, 1, T, S) bool, True where a query may read a key, for keys (B, S) of which
    the last T = S - q_start are this call's queries. real_keys is False at padding.

    Allowed = causal & real key & (query - key < sliding_window). Slots count the sequence as laid
    out, left padding included, so the band equals transformers' Mistral mask for real tokens.
    """
    S = real_keys.shape[1]
    q_slot = torch.arange(q_start, S, device=real_keys.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=real_keys.device)[None, :]  # (1, S)
    allowed = k_slot <= q_slot  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    allowed = allowed[None, None] & real_keys[:, None, None, :]  # (B, 1, T, S)
    # A padding query with every key masked would give NaN, which later layers would spread
    # through zero-weighted values into real rows; letting it see itself keeps it finite.
    return allowed | (k_slot == q_slot)


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K kv heads, H/K each (K = H is plain MHA)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, K, D = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.wq = nn.Linear(C, H * D, bias=False)
        self.wk = nn.Linear(C, K * D, bias=False)
        self.wv = nn.Linear(C, K * D, bias=False)
        self.wo = nn.Linear(H * D, C, bias=False)

    def forward(self, x: Tensor, rope: Rope, attn_mask: Tensor | None) -> Tensor:
        q, k, v = self.project(x, rope)
        return self.attend(q, k, v, attn_mask)  # (B, T, C)

    def project(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, D) and k, v (B, K, T, D) for x (B, T, C); q and k rotated by RoPE."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D)
        k = self.wk(x).view(B, T, K, D)
        v = self.wv(x).view(B, T, K, D)
        q = rope.rotate(q).transpose(1, 2)  # (B, H, T, D)
        k = rope.rotate(k).transpose(1, 2)  # (B, K, T, D)
        return q, k, v.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(D)) v over S keys (B, K, S, D), then the output projection:
        (B, T, C). attn_mask (B, 1, T, S) bool; None means causal over the T tokens alone."""
        B, _, T, D = q.shape
        # GQA: query head h reads kv head h // (H/K) (`.repeat` would give h % K). SDPA's
        # enable_gqa does exactly that without copying k and v.
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None,
            scale=1.0 / math.sqrt(D),
            enable_gqa=k.shape[1] != q.shape[1],
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.wo(out)  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate_proj
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down_proj
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, rope: Rope, attn_mask: Tensor | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, attn_mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        # Recompute each block in backward instead of storing its activations (training only).
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Logits (B, T, V) for every position of tokens (B, T); see hidden_states."""
        return self.output(self.hidden_states(tokens, positions, attn_mask))

    def hidden_states(
        self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Final-norm hidden states (B, T, C), the LM head's input, for tokens (B, T).

        positions (B, T): RoPE positions, 0..T-1 unless given (left padding, logps_fused.py's
        shared prompts). attn_mask (B, 1, T, T) bool, True where a query may read a key: causal
        (within Mistral's window) unless given; `causal_mask` builds one for padded rows.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        window = self.config.sliding_window
        if attn_mask is None and window is not None and T > window:
            real_keys = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
            attn_mask = causal_mask(real_keys, window)  # SDPA's is_causal has no window
        x = self.tok_embeddings(tokens)  # (B, T, C)
        rope = self.rope(positions, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, rope, attn_mask, use_reentrant=False)
            else:
                x = layer(x, rope, attn_mask)
        return self.norm(x)  # (B, T, C)
