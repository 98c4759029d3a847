"""CUDA checks, run on a GPU machine (`pytest -m gpu`); skipped where there is no CUDA device.

The CPU tests pin the math; these check that the same code keeps it on CUDA: the hand-written
backward passes under bf16 autocast, log-probs and gradients against the CPU in fp32, the CUDA
branches of models/kernels.py against llama.py, greedy sampling against the CPU, torchrun's
NCCL + FSDP2 path (one process), and a rejection-sampling run in bf16 autocast.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, write_synthetic_pairs
from model_fixtures import our_model, random_ids, tiny_config
from ropo.config_load import load_config
from ropo.data import TokenizedPair
from ropo.logps_fused import collate_pairs, response_logps
from ropo.models import Transformer, generate
from ropo.models.kernels import FastRMSNorm, use_fast_kernels
from ropo.models.llama import causal_mask
from ropo.train import train

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
    model = use_fast_kernels(Transformer(tiny_config()))  # as load_model gives it to training
    cpu_margins, cpu_grads = logps_and_grads(model, "cpu", autocast=False)
    cuda_margins, cuda_grads = logps_and_grads(model, "cuda", autocast=False)
    assert torch.allclose(cuda_margins, cpu_margins, rtol=0, atol=1e-4)
    for name, grad in cpu_grads.items():
        assert torch.allclose(cuda_grads[name], grad, rtol=1e-3, atol=1e-4), name


def test_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = use_fast_kernels(Transformer(tiny_config()))
    exact_margins, exact_grads = logps_and_grads(model, "cuda", autocast=False)
    bf16_margins, bf16_grads = logps_and_grads(model, "cuda", autocast=True)
    assert (bf16_margins - exact_margins).abs().max() <= 0.1
    for name, grad in exact_grads.items():
        error = (bf16_grads[name] - grad).norm() / grad.norm().clamp(min=1e-6)
        assert error <= 0.05, (name, error)


def test_rms_norm_on_cuda_matches_the_cpu_function() -> None:
    # CUDA takes F.rms_norm's fused kernels, CPU the hand-written backward: same values.
    torch.manual_seed(0)
    norm = FastRMSNorm(64, 1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = 3 * torch.randn(4, 5, 64)
    grad_out = torch.randn(4, 5, 64)
    results = []
    for device in ("cpu", "cuda"):
        norm.to(device).zero_grad(set_to_none=True)
        leaf = x.to(device, copy=True).requires_grad_()
        out = norm(leaf)
        out.backward(grad_out.to(device))
        results.append([t.detach().cpu() for t in (out, leaf.grad, norm.weight.grad)])
    for on_cpu, on_cuda in zip(*results, strict=True):
        assert torch.allclose(on_cuda, on_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fast_kernels_on_cuda_equal_the_textbook_model(dtype: torch.dtype, tol: float) -> None:
    # F.rms_norm, the rolled RoPE and FastAttention's k/v copy (GQA under a padding mask).
    textbook = our_model("mistral", num_attention_heads=8, num_key_value_heads=2, sliding_window=5)
    textbook = textbook.to("cuda", dtype).train()
    fast = use_fast_kernels(copy.deepcopy(textbook))
    ids = random_ids(2, 14).cuda()
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, 9:] = False
    mask = causal_mask(real, textbook.config.sliding_window)
    results = []
    for model in (fast, textbook):
        logits = model(ids, attn_mask=mask).float()
        logits[real].log_softmax(-1)[:, 7].sum().backward()
        results.append([logits[real].detach(), *(p.grad for p in model.parameters())])
    for ours, reference in zip(results[0], results[1], strict=True):
        assert (ours.float() - reference.float()).abs().max() <= tol * reference.float().abs().max()


def test_greedy_sampling_on_cuda_equals_cpu() -> None:
    torch.manual_seed(0)
    model = use_fast_kernels(Transformer(tiny_config())).eval()
    prompts = [[1, 5, 9, 11], [1, 7], [1, 3, 4, 20, 21, 22]]
    on_cpu = generate(model, prompts, max_new_tokens=12, temperature=0, eos_id=2)
    on_cuda = generate(model.to("cuda"), prompts, max_new_tokens=12, temperature=0, eos_id=2)
    assert on_cuda == on_cpu


# A ROPO run small enough for a test: 21 pairs, two rounds, a quarter dropped each round.
RUN = ("loss=ropo", "rounds=2", "rho=0.25", "noise=0.25", "batch_size=4", "grad_accum=2",
       "lr=3e-3", "warmup_ratio=0", "max_length=64", "log_every=1", "save_every=0")  # fmt: skip


def test_torchrun_with_nccl_trains_like_a_plain_cuda_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # One process under torchrun takes the NCCL + FSDP2 path end to end on the GPU.
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 21)
    args = [f"model={tiny_model_dir}", f"data={data}", *RUN, "device=cuda"]
    plain = train(load_config(None, [*args, f"out={tmp_path / 'plain'}"]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command = [*launch, "-m", "ropo", "train", *args, f"out={tmp_path / 'nccl'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged, expected = (read_jsonl(run / "train_log.jsonl") for run in (tmp_path / "nccl", plain))
    assert [r["step"] for r in logged] == [r["step"] for r in expected]
    for ours, theirs in zip(logged, expected, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
    kept = lambda run: [(r["round"], r["id"], r["kept"]) for r in read_jsonl(run / "pairs.jsonl")]  # noqa: E731
    assert kept(tmp_path / "nccl") == kept(plain)


def test_rejection_sampling_run_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_synthetic_pairs(tmp_path / "pairs.jsonl", 21)
    sampling = ("rejection_sampling=true", "rs_k=2", "rs_max_new_tokens=8")
    args = [f"model={tiny_model_dir}", f"data={data}", *RUN, *sampling, "device=cuda",
            "autocast=bfloat16", f"out={tmp_path / 'rs'}"]  # fmt: skip
    run = train(load_config(None, args))
    sampled = read_jsonl(run / "sampled_pairs.jsonl")
    assert sampled, "no pair was sampled for the dropped prompts"
    assert (run / "final" / "model.safetensors").exists()
