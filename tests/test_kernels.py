"""Hand-written pieces against the formulas they replace, values and gradients: RMSNorm's
closed-form backward, the roll form of RoPE, and the in-place backward of the target log-probs."""

import pytest
import torch

from ropo.logps import TargetLogProbs
from ropo.models.llama import RMSNormFunction, apply_rope, rope_cos_sin


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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_roll_form_equals_rotate_half(dtype, tol) -> None:
    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 7, 50], [3, 4, 5, 6, 1000]])
    x = torch.randn(2, 5, 3, 16).to(dtype)
    grad_out = torch.randn(2, 5, 3, 16).to(dtype)
    cos, signed_sin = rope_cos_sin(positions, 16, 10000.0, dtype)
    results = []
    for rope in (lambda x: apply_rope(x, cos, signed_sin), lambda x: hf_rope(x, positions, 1e4)):
        leaf = x.clone().requires_grad_()
        out = rope(leaf)
        out.backward(grad_out)
        results.append((out, leaf.grad))
    for ours, reference in zip(results[0], results[1], strict=True):
        assert (ours.float() - reference.float()).abs().max() <= tol * reference.float().abs().max()


def test_target_logprobs_match_autograd_of_log_softmax_and_gather() -> None:
    torch.manual_seed(0)
    logits = 4 * torch.randn(6, 11, dtype=torch.float64)
    targets = torch.tensor([0, 3, 3, 10, 5, 0])
    grad = torch.randn(6, dtype=torch.float64)
    ours_leaf, reference_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = TargetLogProbs.apply(ours_leaf, targets)
    reference = reference_leaf.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    ours.backward(grad)
    reference.backward(grad)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-12)
    assert torch.allclose(ours_leaf.grad, reference_leaf.grad, rtol=0, atol=1e-12)


def test_target_logprobs_refuse_a_second_backward() -> None:
    # The backward reuses its saved log-probs in place; a retained graph must fail loudly.
    logits = torch.randn(3, 5, requires_grad=True)
    out = TargetLogProbs.apply(logits, torch.tensor([1, 2, 3])).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
