"""The Llama/Mistral decoder: token ids -> hidden states -> logits for every position.

Built from a ModelConfig (models/config.py; load.py fills the weights); log-prob code calls it on
right-padded batches, and sample.py drives it with a KVCache. Mistral = Llama + sliding window.

Notation: B batch, T new tokens, S key slots (cached + new), H query heads, K kv heads,
D head_dim, C model width, V vocab.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ropo.models.config import ModelConfig


class KVCache:
    """Keys and values of every layer, preallocated and filled left to right by forward calls.

    key_mask (B, S_max) remembers which slots hold real tokens; `length` is how many slots the
    earlier calls filled. The caller creates it and passes it to Transformer.forward.
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
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def append_keys(self, new_keys: Tensor) -> Tensor:
        """Record which of this call's T tokens are real; return the mask of all keys (B, S)."""
        end = self.length + new_keys.shape[1]
        if end > self.key_mask.shape[1]:
            raise ValueError(f"KVCache has {self.key_mask.shape[1]} slots, {end} are needed")
        self.key_mask[:, self.length : end] = new_keys
        return self.key_mask[:, :end]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this call's k, v (B, K, T, D) after the cached slots; return all (B, K, S, D)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:
            # CUDA has fused rms_norm kernels, forward and backward: 142 instead of 151 ms per
            # 1B-shape step on an H100. On CPU the backward is not fused; see RMSNormFunction.
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return self.weight * normed.to(x.dtype)
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """weight * n with n = x * rstd, rstd = rsqrt(mean(x^2) + eps), and a closed-form backward.

    HF order: n in fp32, cast back to x's dtype, and only then scaled. Backward, with g the
    gradient of the output and dn = g * weight (one row, C wide):
        dx = rstd * (dn - n * mean(dn * n)),    dweight = sum over rows of g * n.
    Autograd through F.rms_norm runs about ten elementwise kernels in backward on CPU; this runs
    five (1.1 -> 0.3 ms at (8, 192, 256) on 2 cores, nine norms per step). Used on CPU only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays, for gradcheck)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd  # recomputed: one pass, and exact where x is bf16
        grad_weight = None
        if ctx.needs_input_grad[1]:  # frozen under LoRA
            grad_weight = (grad_out * normed.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = (grad_out * weight).to(rstd.dtype)
        mean_term = (grad_normed * normed).mean(-1, keepdim=True)  # (..., 1)
        grad_x = rstd * (grad_normed - normed * mean_term)
        return grad_x.to(x.dtype), grad_weight, None


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and signed sin (B, T, 1, D) for integer positions (B, T), in fp32 then cast to dtype.

    The sin's first half is negated, so that apply_rope needs a roll instead of rotate-half.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
    inv_freq = (1.0 / theta**exponents).to(positions.device)  # (D/2,), made on CPU as in HF
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    half_cos, half_sin = freqs.cos(), freqs.sin()
    cos = torch.cat((half_cos, half_cos), dim=-1)  # (B, T, D): half-split layout of HF
    signed_sin = torch.cat((-half_sin, half_sin), dim=-1)  # (B, T, D)
    return cos[:, :, None].to(dtype), signed_sin[:, :, None].to(dtype)  # (B, T, 1, D) each


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate x (B, T, heads, D) pairing dim j with j + D/2 (rotate-half, as HF checkpoints).

    HF writes x * cos + cat(-x2, x1) * sin; with the sign folded into the sin that is
    x * cos + cat(x2, x1) * signed_sin, and cat(x2, x1) is a roll by D/2. Three kernels forward
    and four backward instead of five and seven (half the time at (8, 192, 8, 32) on CPU).
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def build_attention_mask(
    key_mask: Tensor, q_start: int, T: int, sliding_window: int | None
) -> Tensor:
    """Boolean (B, 1, T, S) from key_mask (B, S): True where a query may read a key.

    Allowed = causal & real key & (q - k < sliding_window). Slots index the sequence as laid out,
    left padding included, so the band equals transformers' Mistral mask for every real token.
    """
    S = key_mask.shape[1]
    q_slot = torch.arange(q_start, q_start + T, device=key_mask.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    allowed = k_slot <= q_slot  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    allowed = allowed[None, None] & key_mask[:, None, None, :]  # (B, 1, T, S)
    # A padding query with every key masked would give NaN, which later layers would spread
    # through zero-weighted values into real rows; letting it see itself keeps it finite.
    return allowed | (k_slot == q_slot)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KVCache slot this layer writes
        C, H, K, D = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.wq = nn.Linear(C, H * D, bias=False)
        self.wk = nn.Linear(C, K * D, bias=False)
        self.wv = nn.Linear(C, K * D, bias=False)
        self.wo = nn.Linear(H * D, C, bias=False)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, kv_cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D)
        k = self.wk(x).view(B, T, K, D)
        v = self.wv(x).view(B, T, K, D)
        q = apply_rope(q, *rope).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k, *rope).transpose(1, 2)  # (B, K, T, D)
        v = v.transpose(1, 2)  # (B, K, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        # GQA: query head h reads kv head h // (H / K) (`.repeat` would give h % K). SDPA's
        # enable_gqa does exactly that without copying k and v, which matters with a long cache.
        scale = 1.0 / math.sqrt(D)
        gqa = H != K
        if gqa and mask is not None and q.is_cuda and T > 1:
            # On CUDA no fused kernel takes a mask with enable_gqa (flash refuses masks, the
            # memory-efficient one unequal head counts): the math kernel would hold (B, H, T, S)
            # scores per layer. Copying k and v keeps the memory-efficient kernel. (One decoded
            # token's scores are small, so sampling keeps enable_gqa.)
            k = k.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
            gqa = False
        if mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
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
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, kv_cache: KVCache | None
    ) -> Tensor:
        """rope: (cos, signed_sin) from rope_cos_sin, shared by every layer."""
        x = x + self.attention(self.attention_norm(x), rope, mask, kv_cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        # Recompute each block in backward instead of storing its activations (training only).
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, C) for input_ids (B, T).

        attention_mask (B, T): 1 real, 0 pad. positions (B, T): RoPE positions, needed with left
        padding; default counts on from the cache length. kv_cache continues earlier calls.
        attn_mask (B, 1, T, T) bool, True where a query may read a key: used as is instead of the
        causal mask, for a caller's own layout (logps.py's shared prompts); no cache then.
        """
        B, T = input_ids.shape
        if attn_mask is not None and kv_cache is not None:
            raise ValueError("attn_mask replaces the causal mask and cannot extend a KVCache")
        start = 0 if kv_cache is None else kv_cache.length
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.tok_embeddings(input_ids)  # (B, T, C)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = (
            attn_mask if attn_mask is not None else self._mask(input_ids, attention_mask, kv_cache)
        )
        for layer in self.layers:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(layer, x, rope, mask, None, use_reentrant=False)
            else:
                x = layer(x, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for every position; no loss, nothing kept between calls."""
        return self.output(self.hidden_states(input_ids, attention_mask, positions, kv_cache))

    def _mask(
        self, input_ids: Tensor, attention_mask: Tensor | None, kv_cache: KVCache | None
    ) -> Tensor | None:
        # None selects SDPA's is_causal fast path: no padding, no cache, window not reached.
        T = input_ids.shape[1]
        window = self.config.sliding_window
        if kv_cache is None and attention_mask is None and (window is None or T <= window):
            return None
        new_keys = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            new_keys = attention_mask.bool()  # (B, T)
        if kv_cache is None:
            return build_attention_mask(new_keys, 0, T, window)
        return build_attention_mask(kv_cache.append_keys(new_keys), kv_cache.length, T, window)
