"""`make bench`'s decoding part: batched greedy decoding, ours against transformers' generate.

Both sides load one checkpoint and decode the same prompts greedily; their new tokens must be
identical, or the timings would compare two different computations. A decode step is bounded by
memory bandwidth: it reads every weight and the live KV cache once, for one token per row.
Kept free of TRL and of the other bench modules, so tests/test_bench_decoding.py loads this file.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ropo.models import Transformer, generate, load_model


@dataclass(frozen=True)
class DecodeWorkload:
    """`batch` prompts of `prompt_tokens` random ids each (no padding), `new_tokens` decoded."""

    batch: int = 8
    prompt_tokens: int = 64
    new_tokens: int = 64
    seed: int = 1

    @property
    def decode_steps(self) -> int:
        """Forwards of one token per row: the first new token comes from the prompt's pass."""
        return self.new_tokens - 1


def make_prompts(workload: DecodeWorkload, vocab: int, bos_id: int) -> list[list[int]]:
    """BOS + random ids above the special ones (0, 1, 2), all of one length."""
    generator = torch.Generator().manual_seed(workload.seed)
    draw = torch.randint(
        3, vocab, (workload.batch, workload.prompt_tokens - 1), generator=generator
    )
    return [[bos_id, *row] for row in draw.tolist()]


def ours_greedy(model: Transformer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """`ropo generate`'s sampler at temperature 0, without EOS: every row runs `new_tokens`."""
    return generate(model, prompts, new_tokens, temperature=0)


def load_transformers(
    model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Any:
    """The checkpoint as transformers' LlamaForCausalLM (SDPA attention), its EOS switched off.

    generate fills whatever its generation_config argument leaves unset from the checkpoint's
    own, EOS included, so EOS is unset there; both sides then decode every row to full length.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    return hf


def transformers_greedy(hf: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' generate, greedy, its default cache; `hf` from load_transformers."""
    from transformers import GenerationConfig

    ids = torch.tensor(prompts, device=hf.device)  # (B, P): equal lengths, nothing to pad
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=hf.config.pad_token_id
    )
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.shape[1] :].tolist()  # (B, new_tokens)


def transformers_margins(
    hf: Any, prompts: list[list[int]], new_tokens: int
) -> tuple[list[list[int]], Tensor]:
    """transformers' greedy tokens, as transformers_greedy, and at each its logit's lead over the
    runner-up (B, new_tokens): how near a tie each choice was, to tell rounding from a bug."""
    from transformers import GenerationConfig

    ids = torch.tensor(prompts, device=hf.device)  # (B, P)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=hf.config.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    top2 = torch.stack(out.logits, dim=1).float().topk(2, dim=-1).values  # (B, new_tokens, 2)
    return out.sequences[:, ids.shape[1] :].tolist(), (top2[..., 0] - top2[..., 1]).cpu()


def first_difference(
    ours: list[list[int]], theirs: list[list[int]], margins: Tensor | None = None
) -> str | None:
    """None when both sides decoded the same tokens; else where they first part (and by how
    much transformers' choice led there, given its `margins` from transformers_margins)."""
    if len(ours) != len(theirs):
        return f"{len(ours)} rows against transformers' {len(theirs)}"
    for row, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
        for position, (a, b) in enumerate(zip(mine, other, strict=False)):  # lengths: below
            if a != b:
                lead = "" if margins is None else f" (its lead: {margins[row, position]:.2g})"
                return f"row {row}, new token {position}: ours {a}, transformers {b}{lead}"
        if len(mine) != len(other):
            return f"row {row}: {len(mine)} new tokens against transformers' {len(other)}"
    return None


def copy_bandwidth(mib: int = 256, seconds: float = 1.0, device: str = "cpu") -> float:
    """Best bytes/s of one large fp32 tensor copy, counting its read and its write (as STREAM's
    copy does), over about `seconds` seconds. `mib` per tensor, well above any cache."""
    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: pages touched, thread pool started
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * src.nbytes / (time.perf_counter() - tick))
    return best


def decode_bytes_per_step(model: Transformer, workload: DecodeWorkload) -> dict[str, float]:
    """Bytes one decode step must read, averaged over the steps: weights and the live KV cache.

    Weights: every parameter once (a tied embedding is the LM head; an untied table is only
    looked up, B rows of it, and not counted). KV cache: keys and values of every layer at
    every slot the new token attends to: prompt + the new tokens so far, P + N/2 on average.
    """
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not config.tie_word_embeddings:
        weights -= model.tok_embeddings.weight.nbytes
    element = model.tok_embeddings.weight.element_size()
    mean_keys = workload.prompt_tokens + workload.new_tokens / 2
    per_key = 2 * config.n_layers * config.n_kv_heads * config.head_dim * element  # k and v
    kv = workload.batch * mean_keys * per_key
    return {"weights": float(weights), "kv_cache": kv, "total": weights + kv}


def time_both(
    ours: Transformer, hf: Any, prompts: list[list[int]], workload: DecodeWorkload, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each side's full decode and of its prompt pass alone, sides alternating.

    A prompt pass alone is generate with one new token (no decode step): the difference of the
    two is the time of the decode steps, which the bandwidth bound is about.
    """
    runs = {
        "ours": lambda n: ours_greedy(ours, prompts, n),
        "transformers": lambda n: transformers_greedy(hf, prompts, n),
    }
    seconds: dict[str, list[float]] = {
        f"{side}_{part}": [] for side in runs for part in ("full", "prompt")
    }
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for side in order:
            for part, n in (("full", workload.new_tokens), ("prompt", 1)):
                start = time.perf_counter()
                runs[side](n)
                seconds[f"{side}_{part}"].append(time.perf_counter() - start)
    return seconds


def summarize(
    seconds: dict[str, list[float]],
    workload: DecodeWorkload,
    bytes_per_step: dict,
    bandwidth: float,
) -> dict[str, Any]:
    """New tokens/s of each side (whole generate call, prompt pass included), its decode steps'
    tokens/s, and those against the bandwidth bound: B tokens per `bytes_per_step` read."""
    B, N = workload.batch, workload.new_tokens
    bound = B * bandwidth / bytes_per_step["total"]  # decode tokens/s if only the reads counted
    sides = {}
    for side in ("ours", "transformers"):
        full, prompt = seconds[f"{side}_full"], seconds[f"{side}_prompt"]
        # full and prompt-only ran back to back: their difference per repeat, then the median
        decode = statistics.median(f - p for f, p in zip(full, prompt, strict=True))
        decode_tokens_per_s = B * workload.decode_steps / max(decode, 1e-9)
        sides[side] = {
            "seconds": statistics.median(full),
            "prompt_seconds": statistics.median(prompt),
            "decode_seconds": decode,
            "new_tokens_per_s": B * N / statistics.median(full),
            "decode_tokens_per_s": decode_tokens_per_s,
            "share_of_bound": decode_tokens_per_s / bound,
            "runs_timed": len(full),
        }
    ratio = lambda key: sides["ours"][key] / sides["transformers"][key]  # noqa: E731
    return {
        "sides": sides,
        "new_tokens_per_s_vs_transformers": ratio("new_tokens_per_s"),
        "decode_tokens_per_s_vs_transformers": ratio("decode_tokens_per_s"),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bytes_per_step": bytes_per_step,
        "bound_decode_tokens_per_s": bound,
    }


def run_decoding(
    model_dir: Path,
    workload: DecodeWorkload,
    repeats: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Load both sides from `model_dir`, check their greedy tokens, then time them in turn.

    The equality check runs first and doubles as both sides' warm-up; "first_difference" says
    where they part when they do (the caller fails the bench then), "smallest_margin" how near
    a tie the closest of transformers' choices was. On CUDA (bench/gpu_measure.py) the copy
    that measures the bandwidth is 1 GiB, past the L2 cache of any GPU.
    """
    ours = load_model(model_dir, dtype=dtype, device=device).eval()
    hf = load_transformers(model_dir, dtype, device)
    prompts = make_prompts(workload, ours.config.vocab_size, ours.config.bos_token_id or 1)
    theirs, margins = transformers_margins(hf, prompts, workload.new_tokens)
    difference = first_difference(ours_greedy(ours, prompts, workload.new_tokens), theirs, margins)
    seconds = time_both(ours, hf, prompts, workload, repeats)
    bandwidth = copy_bandwidth(mib=1024 if device != "cpu" else 256, device=device)
    summary = summarize(seconds, workload, decode_bytes_per_step(ours, workload), bandwidth)
    return {
        "same_tokens": difference is None,
        "first_difference": difference,
        "smallest_margin": margins.min().item(),
        "workload": vars(workload) | {"dtype": str(dtype), "device": device},
        "seconds": seconds,
    } | summary
