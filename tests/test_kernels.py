"""models/kernels.py's variants against the textbook modules of models/llama.py (and the formulas
transformers writes), values and gradients: RMSNorm's closed-form backward, the roll form of
RoPE, the k/v copy for grouped-query attention, the packed linear layer of decoding, and
whole models with every variant swapped in."""

import copy
from contextlib import nullcontext

import pytest
import torch

from model_fixtures import our_model, random_ids
from ropo.models import kernels
from ropo.models.kernels import (
    FastAttention,
    FastRMSNorm,
    PackedLinear,
    RMSNormFunction,
    RolledRotaryEmbedding,
    SwiGLUFeedForward,
    packable,
    packed_for_decoding,
    use_fast_kernels,
)
from ropo.models.llama import Attention, FeedForward, RMSNorm, RotaryEmbedding, causal_mask
from ropo.models.lora import LoRALinear, apply_lora


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm, written out: fp32 statistics, cast back, then the weight
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def hf_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # transformers' rotate_half form with an unsigned sin
    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float) / D)
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # (B, T, 1, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * angles.cos().to(x.dtype) + torch.cat((-x2, x1), dim=-1) * angles.sin().to(x.dtype)


def values_and_grads(fn, *inputs: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to each input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def test_rms_norm_backward_passes_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, weight))


@pytest.mark.parametrize(
    "x_dtype, weight_dtype, tol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.bfloat16, 2e-2),
        (torch.bfloat16, torch.float32, 2e-2),
    ],
)
def test_rms_norm_matches_autograd_through_hf_formula(x_dtype, weight_dtype, tol) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(4, 5, 64)).to(x_dtype)
    weight = (1 + 0.1 * torch.randn(64)).to(weight_dtype)
    grad_out = torch.randn(4, 5, 64)
    results = []
    for norm in (
        lambda x, w: RMSNormFunction.apply(x, w, 1e-5),
        lambda x, w: hf_rms_norm(x, w, 1e-5),
    ):
        x_leaf, w_leaf = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = norm(x_leaf, w_leaf)
        out.backward(grad_out.to(out.dtype))
        results.append((out, x_leaf.grad, w_leaf.grad))
    for ours, reference in zip(results[0], results[1], strict=True):
        assert ours.dtype == reference.dtype
        scale = reference.float().abs().max()
        assert (ours.float() - reference.float()).abs().max() <= tol * scale


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fast_rms_norm_equals_the_textbook_module(dtype, tol) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(4, 5, 64)).to(dtype)
    grad_out = torch.randn(4, 5, 64)
    textbook = RMSNorm(64, 1e-5).to(dtype)
    torch.nn.init.normal_(textbook.weight, 1.0, 0.1)
    fast = use_fast_kernels(copy.deepcopy(textbook))
    assert type(fast) is FastRMSNorm
    results = []
    for norm in (fast, textbook):
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        out.backward(grad_out.to(out.dtype))
        results.append((out, leaf.grad, norm.weight.grad))
    # the forward is the same sequence of operations, so it is equal to the bit
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[1][0], hf_rms_norm(x, textbook.weight, 1e-5))
    with torch.inference_mode():  # scoring and decoding: F.rms_norm, equal to the bit as well
        assert torch.equal(fast(x), textbook(x))
    for ours, reference in zip(results[0], results[1], strict=True):
        assert (ours.float() - reference.float()).abs().max() <= tol * reference.float().abs().max()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_roll_form_equals_rotate_half(dtype, tol) -> None:
    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 7, 50], [3, 4, 5, 6, 1000]])
    x = torch.randn(2, 5, 3, 16).to(dtype)
    grad_out = torch.randn(2, 5, 3, 16).to(dtype)
    rolled = RolledRotaryEmbedding(16, 10000.0)(positions, dtype)
    textbook = RotaryEmbedding(16, 10000.0)(positions, dtype)
    results = [
        values_and_grads(rope, x, grad_out=grad_out)
        for rope in (rolled.rotate, textbook.rotate, lambda x: hf_rope(x, positions, 1e4))
    ]
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2], strict=True))
    for ours, reference in zip(results[0], results[2], strict=True):
        assert (ours.float() - reference.float()).abs().max() <= tol * reference.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rotation_is_autograd_through_the_roll_form_bit_for_bit(dtype) -> None:
    torch.manual_seed(0)
    rope = RolledRotaryEmbedding(16, 10000.0)(torch.tensor([[0, 1, 2, 7, 50]]), dtype)
    x, grad_out = torch.randn(1, 5, 3, 16).to(dtype), torch.randn(1, 5, 3, 16).to(dtype)

    def by_autograd(x: torch.Tensor) -> torch.Tensor:  # the formula the node replaces
        return torch.addcmul(x * rope.cos, x.roll(8, dims=-1), rope.sin)

    fused = values_and_grads(rope.rotate, x, grad_out=grad_out)
    reference = values_and_grads(by_autograd, x, grad_out=grad_out)
    assert all(torch.equal(a, b) for a, b in zip(fused, reference, strict=True))


def test_kv_copy_equals_enable_gqa_under_a_mask() -> None:
    # FastAttention copies k and v to H heads (on CUDA only); the copy reads as enable_gqa does.
    config = our_model("llama", num_attention_heads=8, num_key_value_heads=2).config
    attention = Attention(config)
    torch.manual_seed(0)
    q = torch.randn(2, 8, 6, config.head_dim)
    k, v = torch.randn(2, 2, 6, config.head_dim), torch.randn(2, 2, 6, config.head_dim)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, 4:] = False
    mask = causal_mask(real, sliding_window=None)
    with torch.no_grad():
        grouped = attention.attend(q, k, v, mask)
        copied = attention.attend(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), mask)
    assert torch.allclose(grouped, copied, rtol=0, atol=1e-6)


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor, real, mask) -> list:
    logits = model(ids, attn_mask=mask).double()
    (logits[real].log_softmax(-1)[:, 7]).sum().backward()
    return [logits[real].detach(), *(p.grad for p in model.parameters())]


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2}),
        ("mistral", {"num_key_value_heads": 2, "sliding_window": 5}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_model_equals_the_textbook_model(kind, overrides, dtype) -> None:
    base = our_model(kind, **overrides).train()
    textbook = copy.deepcopy(base).to(dtype)
    fast = use_fast_kernels(copy.deepcopy(textbook))
    ids = random_ids(2, 14)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, 9:] = False  # right padding
    mask = causal_mask(real, base.config.sliding_window)
    ours, reference = (logits_and_grads(m, ids, real, mask) for m in (fast, textbook))
    if dtype == torch.float32:  # the same sums up to rounding
        for a, b in zip(ours, reference, strict=True):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        return
    # bf16 rounds every op to 8 bits: the textbook model's own gradients are up to ~4% off the
    # exact ones (varying with the CPU's bf16 kernels), so ours are held to its accuracy.
    exact = logits_and_grads(copy.deepcopy(base).double(), ids, real, mask)
    for a, b, truth in zip(ours, reference, exact, strict=True):
        scale = truth.abs().max()
        our_error, textbook_error = (a - truth).abs().max(), (b - truth).abs().max()
        assert our_error <= 2 * textbook_error + 1e-3 * scale


def test_swap_keeps_parameters_and_names() -> None:
    model = our_model("llama", num_key_value_heads=2)
    before = list(model.named_parameters())
    use_fast_kernels(model)
    after = list(model.named_parameters())
    assert [name for name, _ in after] == [name for name, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before, strict=True))  # same objects
    kinds = {type(m) for m in model.modules()}
    fast = {
        FastRMSNorm,
        FastAttention,
        RolledRotaryEmbedding,
        SwiGLUFeedForward,
        PackedLinear,
    }
    assert fast <= kinds
    assert not kinds & {RMSNorm, Attention, RotaryEmbedding, FeedForward, torch.nn.Linear}


PACKED_DTYPES = [torch.float32] + (
    [torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []
)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("rows, bias", [(1, False), (8, False), (64, False), (8, True)])
def test_packed_linear_equals_linear_while_packed(rows: int, bias: bool, dtype) -> None:
    textbook = torch.nn.Linear(256, 1024, bias=bias).to(dtype)  # 1 MiB in fp32: packable
    fast = use_fast_kernels(copy.deepcopy(textbook))
    assert type(fast) is PackedLinear and packable(fast)
    x = torch.randn(rows, 1, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with torch.inference_mode(), packed_for_decoding(fast, rows=8):
        got, want = fast(x), textbook(x)
        bias = fast.bias
        packed = torch.ops.mkldnn._linear_pointwise(x, fast.packed_weight, bias, "none", [], "")
    assert got.shape == want.shape == (rows, 1, 1024) and got.dtype == dtype
    assert torch.equal(got, packed)  # what the variant computes
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # the same sums, reordered
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("case", ["unpacked", "autograd", "after the block", "small weight"])
def test_packed_linear_is_linear_itself_outside_decoding(case: str) -> None:
    in_features = 16 if case == "small weight" else 256
    textbook = torch.nn.Linear(in_features, 1024, bias=False)
    fast = use_fast_kernels(copy.deepcopy(textbook))
    x = torch.randn(8, in_features, generator=torch.Generator().manual_seed(0))
    if case == "after the block":
        with torch.inference_mode(), packed_for_decoding(fast, rows=8):
            fast(x)
    packing = case in ("autograd", "small weight")
    with packed_for_decoding(fast, rows=8) if packing else nullcontext():
        with torch.inference_mode(case != "autograd"):
            got, want = fast(x), textbook(x)
        packed = "packed_weight" in fast.__dict__
    assert packed == (case == "autograd")  # a small weight is never packed
    assert torch.equal(got, want)  # bit for bit: nn.Linear's own kernel
    assert got.requires_grad == (case == "autograd")
    assert "packed_weight" not in fast.__dict__


WIDE = {"hidden_size": 256, "intermediate_size": 1024, "num_key_value_heads": 2}  # packable


@pytest.mark.parametrize("lora_on", [(), ("wq",), ("w3",)])
def test_fused_products_equal_the_textbook_block_while_packed(lora_on: tuple) -> None:
    # wq, wk, wv as one packed product and w1, w3 as another, unless LoRA wraps one of them:
    # then that layer computes its own product and the others are packed alone.
    textbook = our_model("llama", **WIDE)
    if lora_on:
        apply_lora(textbook, rank=4, alpha=8, targets=lora_on)
        for module in textbook.modules():
            if isinstance(module, LoRALinear):  # a trained adapter, not B = 0
                torch.nn.init.normal_(module.lora_b, std=0.1)
    fast = use_fast_kernels(copy.deepcopy(textbook))
    block, fast_block = textbook.layers[0], fast.layers[0]
    x = torch.randn(4, 1, 256, generator=torch.Generator().manual_seed(0))
    rope = textbook.rope(torch.arange(4)[:, None] + 3, x.dtype)
    with torch.inference_mode():
        want = [*block.attention.project(x, rope), block.feed_forward(x)]
        with packed_for_decoding(fast, rows=4):
            packed = {
                name
                for module in fast_block.modules()
                for name in ("packed_qkv", "packed_gate_up", "packed_weight")
                if name in module.__dict__
            }
            got = [*fast_block.attention.project(x, rope), fast_block.feed_forward(x)]
    fused = {"packed_qkv", "packed_gate_up"} - {
        {"wq": "packed_qkv", "w3": "packed_gate_up"}[name] for name in lora_on
    }
    assert packed == fused | {"packed_weight"}  # wo and w2 (and unfused layers) alone
    assert sum("packed_qkv" in m.__dict__ for m in fast.modules()) == 0  # all gone
    for ours, reference in zip(got, want, strict=True):  # the same sums, reordered
        assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_packed_copies_stay_out_of_the_checkpoint_and_go_even_on_errors() -> None:
    model = our_model("llama")
    model.output.weight = torch.nn.Parameter(torch.randn(1024, model.config.dim))  # packable
    fast = use_fast_kernels(copy.deepcopy(model))
    keys = fast.state_dict().keys()
    with pytest.raises(RuntimeError, match="inside"):
        with torch.inference_mode(), packed_for_decoding(fast, rows=4):
            assert "packed_weight" in fast.output.__dict__
            assert fast.state_dict().keys() == keys
            with packed_for_decoding(fast, rows=2):  # nested: reuses the outer copies
                pass
            assert "packed_weight" in fast.output.__dict__
            raise RuntimeError("inside the block")
    assert not any("packed_weight" in m.__dict__ for m in fast.modules())


def test_nothing_is_packed_where_the_copies_would_not_fit(monkeypatch) -> None:
    linear = use_fast_kernels(torch.nn.Linear(256, 1024, bias=False))  # 1 MiB
    x = torch.randn(8, 256)
    monkeypatch.setattr(kernels, "available_memory", lambda: 2**21 - 1)  # under 2 x 1 MiB
    with pytest.warns(UserWarning, match="without packed weights"):
        with torch.inference_mode(), packed_for_decoding(linear, rows=8):
            assert "packed_weight" not in linear.__dict__
            got = linear(x)
    assert torch.equal(got, torch.nn.functional.linear(x, linear.weight))
    monkeypatch.setattr(kernels, "available_memory", lambda: 2**21)
    with torch.inference_mode(), packed_for_decoding(linear, rows=8):
        assert "packed_weight" in linear.__dict__


def test_available_memory_is_a_plausible_size() -> None:
    assert 2**20 < kernels.available_memory() < 2**50


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_weights_oneDNN_cannot_pack_are_left_alone(dtype) -> None:
    linear = use_fast_kernels(torch.nn.Linear(256, 1024, bias=False).to(dtype))
    assert not packable(linear)
    with torch.inference_mode(), packed_for_decoding(linear, rows=8):
        assert "packed_weight" not in linear.__dict__


@pytest.mark.parametrize(
    "dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
)
def test_swiglu_feed_forward_equals_the_textbook_module_bit_for_bit(dtype, autocast) -> None:
    textbook = our_model("llama").layers[0].feed_forward.to(dtype)
    fast = use_fast_kernels(copy.deepcopy(textbook))
    assert type(fast) is SwiGLUFeedForward
    x = torch.randn(2, 5, textbook.w1.in_features, generator=torch.Generator().manual_seed(0))
    grad_out = torch.randn(
        2, 5, textbook.w2.out_features, generator=torch.Generator().manual_seed(1)
    )
    results = []
    for module in (fast, textbook):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            values = values_and_grads(module, x.to(dtype), grad_out=grad_out)
        results.append([*values, *(p.grad for p in module.parameters())])
    for ours, reference in zip(results[0], results[1], strict=True):
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("autocast, fewer", [(False, 2), (True, 1)])
def test_swiglu_keeps_fewer_intermediate_tensors_for_backward(autocast: bool, fewer: int) -> None:
    # silu(gate) and w2's input are recomputed in backward; under autocast w2 stays a module
    # (its input is saved) and only silu(gate) goes.
    textbook = our_model("llama").layers[0].feed_forward
    fast = use_fast_kernels(copy.deepcopy(textbook))
    x = torch.randn(3, 7, textbook.w1.in_features, requires_grad=True)

    def saved_elements(module: torch.nn.Module) -> int:
        sizes = {}  # by storage: one tensor saved by two nodes counts once

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes[t.untyped_storage().data_ptr()] = t.numel()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            module(x)
        return sum(sizes.values()) - x.numel()  # x itself is no activation

    per_tensor = 3 * 7 * textbook.w1.out_features
    assert saved_elements(textbook) - saved_elements(fast) == fewer * per_tensor


def test_swiglu_without_autograd_leaves_w2_to_its_module() -> None:
    # A decode step's w2 is a PackedLinear: the no-grad road must call it, not F.linear.
    fast = use_fast_kernels(copy.deepcopy(our_model("llama").layers[0].feed_forward))
    calls = []
    fast.w2.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fast(torch.randn(2, 1, fast.w1.in_features))
    assert calls == [1]
