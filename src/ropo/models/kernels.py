"""Faster drop-in variants of llama.py's modules; `use_fast_kernels(model)` swaps them in.

A door you can skip: llama.py shows what each variant computes, and tests/test_kernels.py checks
that both give the same values and gradients (bit for bit where only what autograd keeps
changes, within rounding where sums are reordered). load.py swaps them into every model it
loads, so training, the reference cache, SFT, eval, generation, the built-in task and the
benchmarks all run them. Each variant subclasses its textbook module, adds no parameters and
changes only how the result is computed, so checkpoints, LoRA and FSDP see the same model.
Timings come from docs/performance.md and bench/.
"""

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ropo.models.llama import Attention, FeedForward, RMSNorm, Rope, RotaryEmbedding


class FastRMSNorm(RMSNorm):
    """Replaces RMSNorm.forward. On CUDA, F.rms_norm's fused kernels, forward and backward: 142
    instead of 151 ms per 1B-shape step on an H100. On CPU, RMSNormFunction's backward when there
    is a backward; without one (scoring, decoding) F.rms_norm, the textbook's sums to the bit in
    one call instead of five (20 against 29 us per norm of a decode step on 2 cores, too little
    to show in a whole step), where an autograd.Function call would cost 140."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda or not torch.is_grad_enabled():
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return self.weight * normed.to(x.dtype)
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """weight * n with n = x * rstd, rstd = rsqrt(mean(x^2) + eps), and a closed-form backward.

    HF order: n in fp32, cast back to x's dtype, and only then scaled. Backward, with g the
    gradient of the output and dn = g * weight (one row, C wide):
        dx = rstd * (dn - n * mean(dn * n)),    dweight = sum over rows of g * n.
    Autograd through the formula runs about ten elementwise kernels in backward on CPU; this
    runs five (1.1 -> 0.3 ms at (8, 192, 256) on 2 cores, nine norms per step).
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


class RolledRope(Rope):
    """Replaces Rope.rotate: `sin` holds a signed sin, its first half negated, so that
    cat(-x2, x1) * sin becomes cat(x2, x1) * signed_sin, and cat(x2, x1) is a roll by D/2.
    Three kernels forward and four backward instead of five and seven (half the time at
    (8, 192, 8, 32) on CPU)."""

    def rotate(self, x: Tensor) -> Tensor:
        return RolledRotation.apply(x, self.cos, self.sin)


class RolledRotation(torch.autograd.Function):
    """RolledRope's rotation as one autograd node that saves only cos and sin, which every layer
    shares, instead of a rolled copy of q and of k per layer (140 MB at SmolLM2-135M's shape and
    1,536 tokens). Rolling by D/2 is its own inverse, so the backward is
    grad * cos + roll(grad * signed_sin): autograd's two terms in the same order. Both ways the
    roll is no tensor of its own: each half of the output adds the other half's product in
    place, the same sums as the roll and addcmul of the formula, to the bit.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, signed_sin)
        out = x * cos
        half = x.shape[-1] // 2
        out[..., :half].addcmul_(x[..., half:], signed_sin[..., :half])  # roll(x)[j] = x[j + D/2]
        out[..., half:].addcmul_(x[..., :half], signed_sin[..., half:])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        cos, signed_sin = ctx.saved_tensors
        by_sin = grad_out * signed_sin
        grad_x = grad_out * cos
        half = grad_x.shape[-1] // 2
        grad_x[..., :half] += by_sin[..., half:]
        grad_x[..., half:] += by_sin[..., :half]
        return grad_x, None, None


class RolledRotaryEmbedding(RotaryEmbedding):
    """Replaces RotaryEmbedding.forward: the same angles, as RolledRope's cos and signed sin."""

    def forward(self, positions: Tensor, dtype: torch.dtype) -> Rope:
        half = self.angles(positions)  # (B, T, D/2)
        half_cos, half_sin = half.cos(), half.sin()
        cos = torch.cat((half_cos, half_cos), dim=-1)  # (B, T, D)
        signed_sin = torch.cat((-half_sin, half_sin), dim=-1)  # (B, T, D)
        return RolledRope(cos[:, :, None].to(dtype), signed_sin[:, :, None].to(dtype))


class FastAttention(Attention):
    """Replaces Attention.project while `packed_for_decoding` holds: wq, wk and wv as one product
    with their weights packed side by side (see PackedLinear), about 10% off a decode step at
    SmolLM2-135M's shape next to packing each alone.

    Replaces Attention.attend on CUDA when a mask meets grouped-query heads: copies k and v to H
    heads, which keeps the memory-efficient kernel. No fused CUDA kernel takes a mask with
    enable_gqa (flash refuses masks, the memory-efficient one unequal head counts), and the math
    kernel would hold (B, H, T, S) scores per layer. One decoded token's scores are small, so
    sampling's decode steps (T = 1) keep enable_gqa."""

    def project(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        packed = packed_copy(self, "packed_qkv")
        if packed is None:
            return super().project(x, rope)
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = packed_product(x, packed).split([H * D, K * D, K * D], dim=-1)
        q = rope.rotate(q.view(B, T, H, D)).transpose(1, 2)  # (B, H, T, D)
        k = rope.rotate(k.view(B, T, K, D)).transpose(1, 2)  # (B, K, T, D)
        return q, k, v.view(B, T, K, D).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        H, K, T = q.shape[1], k.shape[1], q.shape[2]
        if H != K and attn_mask is not None and q.is_cuda and T > 1:
            k = k.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
        return super().attend(q, k, v, attn_mask)


class SwiGLUFeedForward(FeedForward):
    """Replaces FeedForward.forward: w2(silu(gate) * up) keeping only gate and up for backward.

    Autograd would also keep silu(gate), and w2 its input silu(gate) * up: two tensors of
    (tokens, intermediate) per layer, about 570 MB at SmolLM2-135M's shape and 1,536 tokens.
    Backward recomputes both (two elementwise kernels) and runs the kernels autograd runs, in
    the same order, so values and gradients are identical. A LoRA-wrapped w2 or autocast (whose
    casts are graph nodes of their own) keep w2 as a module and drop only silu(gate). While
    `packed_for_decoding` holds, w1 and w3 run as one product, as FastAttention's projections.
    """

    def forward(self, x: Tensor) -> Tensor:
        packed = packed_copy(self, "packed_gate_up")
        if packed is not None:
            gate, up = packed_product(x, packed).chunk(2, dim=-1)  # w1 and w3 in one product
        else:
            gate, up = self.w1(x), self.w3(x)
        if not torch.is_grad_enabled():  # nothing to keep; w2 may be packed for decoding
            return self.w2(F.silu(gate) * up)
        plain_w2 = isinstance(self.w2, nn.Linear) and self.w2.bias is None
        if plain_w2 and not torch.is_autocast_enabled(x.device.type):
            return SwiGLUDown.apply(gate, up, self.w2.weight)
        return self.w2(SwiGLUFunction.apply(gate, up))


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        return swiglu_backward(grad_out, gate, up)


class SwiGLUDown(torch.autograd.Function):
    """F.linear(silu(gate) * up, weight), keeping gate, up and the weight."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        gate, up, weight = ctx.saved_tensors
        hidden = (F.silu(gate) * up).flatten(0, -2)  # (N, I), as the forward computed it
        grad_2d = grad_out.flatten(0, -2)  # (N, O)
        # linear's backward as autograd runs it for x @ weight^T: grad @ weight for the input,
        # grad^T @ x for the weight.
        grad_hidden = grad_2d.mm(weight).view_as(gate)
        grad_weight = grad_2d.t().mm(hidden) if ctx.needs_input_grad[2] else None
        return *swiglu_backward(grad_hidden, gate, up), grad_weight


def swiglu_backward(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of silu(gate) * up as autograd computes them: mul's backward, then silu's."""
    grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
    return grad_gate, grad_out * F.silu(gate)


class PackedLinear(nn.Linear):
    """Replaces nn.Linear.forward while `packed_for_decoding` holds (sampling on CPU): the product
    with a copy of the weight that oneDNN has laid out in blocks for its matmul kernel, the same
    sums in another order (results differ by rounding). On AMD CPUs MKL's fp32 matmuls take no
    AVX-512 path and oneDNN's do: on 2 such cores SmolLM2-135M's 211 weights take 31-37 instead
    of 45-70 ms per decode step of 8 rows, and its 512-token prompt pass 0.69 instead of 0.8-1.0
    s. Outside that block, with autograd, or off CPU, it is nn.Linear itself.
    """

    MIN_WEIGHT_BYTES = 2**18  # 256 KiB, about a core's L2 cache

    def forward(self, x: Tensor) -> Tensor:
        packed = packed_copy(self, "packed_weight")
        if packed is None:
            return super().forward(x)
        return packed_product(x, packed, self.bias)


def packed_copy(module: nn.Module, attribute: str) -> Tensor | None:
    """The weights packed_for_decoding attached to `module` as `attribute` (only CPU weights are
    packed), when this forward may use them: without autograd. None otherwise."""
    if torch.is_grad_enabled():
        return None
    return module.__dict__.get(attribute)  # a plain attribute, absent outside the block


def packed_product(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ W^T + bias, W given as packed_for_decoding laid it out."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packable(*layers: nn.Module) -> bool:
    """Whether packed_for_decoding packs these layers' weights, side by side: PackedLinear
    layers (a LoRALinear computes its own product, unpacked, and the others of its group are
    then packed alone), without bias when there are several; CPU tensors, not FSDP shards, of
    one dtype, fp32 or bf16 where the CPU has bf16 instructions; 256 KiB or more in all. Smaller
    weights stay in cache from one step to the next, and there oneDNN's call costs more than
    MKL's (26-32 against 10-19 us at the built-in task's shapes, 8 rows)."""
    if not all(isinstance(layer, PackedLinear) for layer in layers):
        return False
    weights = [layer.weight for layer in layers]
    if len(layers) > 1 and any(layer.bias is not None for layer in layers):
        return False
    if any(w.device.type != "cpu" or type(w.data) is not torch.Tensor for w in weights):
        return False
    dtype, size = weights[0].dtype, sum(w.nbytes for w in weights)
    if any(w.dtype != dtype for w in weights) or size < PackedLinear.MIN_WEIGHT_BYTES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


@contextmanager
def packed_for_decoding(model: nn.Module, rows: int) -> Iterator[None]:
    """While it holds, `model`'s packable weights are copied into oneDNN's blocked layout for
    `rows` rows: wq, wk and wv of each FastAttention side by side, w1 and w3 of each
    SwiGLUFeedForward, every other PackedLinear alone. Packing reads every weight once (about
    0.3 s for SmolLM2-135M), and the copies cost as much memory as those weights until the
    block ends: worth it for a generate call, whose decode steps read every weight again. The
    weights must not change meanwhile (generate runs under inference_mode). An enclosing
    block's copies stay, and that block removes them. Where the copies would take more than
    half the memory available, nothing is packed (with a warning): slower, but no worse off
    than before packing existed."""
    packs = packs_of(model)
    needed = sum(layer.weight.nbytes for _, _, layers in packs for layer in layers)
    # the copies, and as much again for the KV cache and the activations
    if packs and 2 * needed > (available := available_memory()):
        warnings.warn(
            f"decoding without packed weights: the copies would take {needed / 2**30:.1f} GiB "
            f"of the {available / 2**30:.1f} GiB of memory available",
            stacklevel=3,
        )
        packs = []
    try:
        for module, attribute, layers in packs:
            weight = torch.cat([layer.weight.detach() for layer in layers])  # (sum out, in)
            # A plain attribute, not a buffer: state_dict, .to() and FSDP never see it.
            setattr(module, attribute, torch.ops.mkldnn._reorder_linear_weight(weight, rows))
        yield
    finally:
        for module, attribute, _ in packs:
            module.__dict__.pop(attribute, None)


def packs_of(model: nn.Module) -> list[tuple[nn.Module, str, tuple[nn.Module, ...]]]:
    """What packed_for_decoding packs: (module, attribute, the layers whose weights the attribute
    holds side by side), leaving out what an enclosing block already packed."""
    packs = []
    for module in model.modules():
        if isinstance(module, FastAttention):
            packs.append((module, "packed_qkv", (module.wq, module.wk, module.wv)))
        elif isinstance(module, SwiGLUFeedForward):
            packs.append((module, "packed_gate_up", (module.w1, module.w3)))
    packs = [pack for pack in packs if packable(*pack[2])]
    fused = {id(layer) for _, _, layers in packs for layer in layers}
    packs += [(m, "packed_weight", (m,)) for m in model.modules() if id(m) not in fused]
    return [p for p in packs if packable(*p[2]) and p[1] not in p[0].__dict__]


def available_memory() -> int:
    """Bytes of memory this machine can still hand out: Linux's MemAvailable (free memory and
    the page cache it can drop), else the free pages alone. Not resources.available_bytes, the
    free pages that a training run's admission check counts conservatively: packed copies may
    push out page cache (a checkpoint just read, say), and skipping them costs only speed."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


ModuleT = TypeVar("ModuleT", bound=nn.Module)

# textbook module -> its faster variant
FAST_VARIANTS: dict[type[nn.Module], type[nn.Module]] = {
    RMSNorm: FastRMSNorm,
    RotaryEmbedding: RolledRotaryEmbedding,
    Attention: FastAttention,
    FeedForward: SwiGLUFeedForward,
    nn.Linear: PackedLinear,
}


def use_fast_kernels(model: ModuleT) -> ModuleT:
    """`model`, in place, with every module of a type in FAST_VARIANTS turned into its variant."""
    for module in model.modules():
        variant = FAST_VARIANTS.get(type(module))
        if variant is not None:
            # Same object, new class: parameters, hooks and checkpoint names stay as they were.
            module.__class__ = variant
    return model
