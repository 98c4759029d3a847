"""CUDA checks, run on a GPU machine (`pytest -m gpu`); skipped where there is no CUDA device.

The CPU tests pin the math; these check that the same code keeps it on CUDA: the hand-written
backward passes under bf16 autocast, log-probs and gradients against the CPU in fp32, and
greedy sampling against the CPU.
"""

import pytest
import torch

from model_fixtures import tiny_config
from ropo.data import TokenizedPair
from ropo.logps import collate_pairs, response_logps
from ropo.models import Transformer, generate
from ropo.models.llama import RMSNorm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def tiny_pairs() -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def draw(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 50, (n,), generator=g).tolist())

    lengths = [(5, 4, 6), (9, 7, 3), (2, 8, 8)]
    return [
        TokenizedPair(f"p{i}", draw(p), draw(c), draw(r)) for i, (p, c, r) in enumerate(lengths)
    ]


def logps_and_grads(model: Transformer, device: str, autocast: bool) -> tuple[torch.Tensor, dict]:
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    batch = collate_pairs(tiny_pairs(), pad_id=0).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logps = response_logps(model, batch)
    margins = logps.chosen - logps.rejected  # (B,)
    margins.sum().backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters()}
    return margins.detach().cpu(), grads


def test_logps_and_gradients_on_cuda_match_cpu_in_fp32() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    cpu_margins, cpu_grads = logps_and_grads(model, "cpu", autocast=False)
    cuda_margins, cuda_grads = logps_and_grads(model, "cuda", autocast=False)
    assert torch.allclose(cuda_margins, cpu_margins, rtol=0, atol=1e-4)
    for name, grad in cpu_grads.items():
        assert torch.allclose(cuda_grads[name], grad, rtol=1e-3, atol=1e-4), name


def test_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    exact_margins, exact_grads = logps_and_grads(model, "cuda", autocast=False)
    bf16_margins, bf16_grads = logps_and_grads(model, "cuda", autocast=True)
    assert (bf16_margins - exact_margins).abs().max() <= 0.1
    for name, grad in exact_grads.items():
        error = (bf16_grads[name] - grad).norm() / grad.norm().clamp(min=1e-6)
        assert error <= 0.05, (name, error)


def test_rms_norm_on_cuda_matches_the_cpu_function() -> None:
    # CUDA takes F.rms_norm's fused kernels, CPU the hand-written backward: same values.
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = 3 * torch.randn(4, 5, 64)
    grad_out = torch.randn(4, 5, 64)
    results = []
    for device in ("cpu", "cuda"):
        norm.to(device).zero_grad(set_to_none=True)
        leaf = x.to(device).requires_grad_()
        out = norm(leaf)
        out.backward(grad_out.to(device))
        results.append([t.detach().cpu() for t in (out, leaf.grad, norm.weight.grad)])
    for on_cpu, on_cuda in zip(*results, strict=True):
        assert torch.allclose(on_cuda, on_cpu, rtol=1e-5, atol=1e-5)


def test_greedy_sampling_on_cuda_equals_cpu() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompts = [[1, 5, 9, 11], [1, 7], [1, 3, 4, 20, 21, 22]]
    on_cpu = generate(model, prompts, max_new_tokens=12, temperature=0, eos_id=2)
    on_cuda = generate(model.to("cuda"), prompts, max_new_tokens=12, temperature=0, eos_id=2)
    assert on_cuda == on_cpu
