"""GPU measurements in one run: matmul peak, our training step for 1B- and 7B-shaped Llamas,
largest batch, scoring and sampling throughput, a transformers-based DPO step as baseline, and
greedy decoding at 7B against transformers' generate (section `decode`, bench/decoding.py).

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python3 bench/gpu_measure.py [--out DIR] [--quick]
Random weights with real shapes; no downloads. Results: DIR/gpu_results.json and a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from decoding import DecodeWorkload, run_decoding

from ropo.config import OptimSettings
from ropo.data import TokenizedPair
from ropo.logps import PairLogps
from ropo.logps_fused import score_pairs
from ropo.loss import get_loss
from ropo.models import ModelConfig, Transformer, generate
from ropo.models.kernels import use_fast_kernels
from ropo.models.lora import apply_lora
from ropo.ref_cache import RefLogps
from ropo.step import StepSettings, make_optimizer, train_step

SHAPES = {
    # Llama-3.2-1B-like widths with the Llama-2 vocabulary; Llama-2-7B exactly.
    "1b": dict(
        vocab_size=32000,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
    ),
    "7b": dict(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        intermediate_size=11008,
    ),
}


def model_config(shape: str) -> ModelConfig:
    return ModelConfig(
        **SHAPES[shape],
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        sliding_window=None,
        tie_word_embeddings=False,
        architecture="LlamaForCausalLM",
        bos_token_id=1,
        eos_token_id=2,
    )


def matmul_peak(dtype: torch.dtype, n: int = 8192, reps: int = 30) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def synthetic_pairs(
    n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0
) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        ids = torch.randint(3, vocab, (prompt_len + 2 * response_len,), generator=g).tolist()
        pairs.append(
            TokenizedPair(
                f"p{i}",
                tuple([1] + ids[: prompt_len - 1]),
                tuple(ids[prompt_len : prompt_len + response_len - 1] + [2]),
                tuple(ids[prompt_len + response_len :][: response_len - 1] + [2]),
            )
        )
    return pairs


def fake_ref(pairs: list[TokenizedPair]) -> RefLogps:
    n = len(pairs)
    counts = torch.tensor([float(len(p.chosen_ids)) for p in pairs])
    logps = PairLogps(torch.full((n,), -900.0), torch.full((n,), -900.0), counts, counts)
    return RefLogps([p.id for p in pairs], logps, "bench")


def median_step(step: Callable[[Any], object], batches: list, warmup: int) -> tuple[float, float]:
    """Run `step` on each batch; median seconds per step after `warmup` steps, peak GiB."""
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i, batch in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def model_flops_per_step(config: ModelConfig, rows: int, seq: int, response: int) -> float:
    """Training FLOPs the math needs (no recomputation): 6 x params x tokens for the blocks,
    the LM head at response positions only, and causal attention scores."""
    C, L = config.dim, config.n_layers
    block_params = config.num_params() - 2 * config.vocab_size * C
    tokens = rows * seq
    head = 6 * config.vocab_size * C * rows * response
    attention = 6 * L * config.n_heads * config.head_dim * seq * tokens  # qk^T and pv, causal/2 x2
    return 6 * block_params * tokens + head + attention


def build(shape: str, weights: torch.dtype, checkpointing: bool, lora_rank: int = 0) -> Transformer:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(weights)
    with torch.device("cuda"):
        model = Transformer(model_config(shape), activation_checkpointing=checkpointing)
    torch.set_default_dtype(previous)
    use_fast_kernels(model)  # as load_model does for every run
    if lora_rank:
        apply_lora(model, lora_rank, 16.0, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
        model.to("cuda")
    return model.train()


def time_steps(
    model: Transformer,
    pairs_per_step: int,
    prompt: int,
    response: int,
    autocast: torch.dtype | None,
    steps: int,
    warmup: int = 2,
) -> dict:
    pairs = synthetic_pairs(
        pairs_per_step * (steps + warmup), prompt, response, model.config.vocab_size
    )
    ref = fake_ref(pairs)
    optimizer = make_optimizer(model, OptimSettings(lr=1e-6))
    settings = StepSettings(
        pad_id=0, max_grad_norm=1.0, device=torch.device("cuda"), autocast=autocast
    )
    loss_fn = get_loss("ropo", beta=0.1)
    batches = [pairs[i : i + pairs_per_step] for i in range(0, len(pairs), pairs_per_step)]
    step = lambda batch: train_step(model, optimizer, [batch], ref, loss_fn, 1e-6, settings)  # noqa: E731
    seconds, peak = median_step(step, batches, warmup)
    optimizer = None  # AdamW's moments freed before the next batch size (step still refers here)
    rows, seq = 2 * pairs_per_step, prompt + response
    return {
        "pairs_per_step": pairs_per_step,
        "seconds_per_step": seconds,
        "tokens_per_s": rows * seq / seconds,
        "model_tflops": model_flops_per_step(model.config, rows, seq, response) / seconds / 1e12,
        "peak_memory_gib": peak,
    }


def sweep_batches(
    shape: str,
    weights: torch.dtype,
    autocast: torch.dtype | None,
    checkpointing: bool,
    batches: list[int],
    prompt: int,
    response: int,
    steps: int,
    peak: float,
    lora_rank: int = 0,
) -> dict:
    label = (
        f"{shape} weights={str(weights)[6:]} autocast={autocast and str(autocast)[6:]} "
        f"ckpt={checkpointing} lora={lora_rank}"
    )
    results, largest = [], 0
    model = build(shape, weights, checkpointing, lora_rank)
    for pairs_per_step in batches:
        try:
            r = time_steps(model, pairs_per_step, prompt, response, autocast, steps)
        except torch.cuda.OutOfMemoryError:
            print(f"{label}: {pairs_per_step} pairs/step -> out of memory")
            break
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        if lora_rank:  # frozen weights need no weight gradients: 4N FLOPs per token, not 6N
            r["model_tflops"] *= 4 / 6
        r["mfu"] = r["model_tflops"] * 1e12 / peak
        results.append(r)
        largest = pairs_per_step
        print(
            f"{label}: {pairs_per_step:3d} pairs/step  {r['seconds_per_step']:.3f} s/step  "
            f"{r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:.1%}  "
            f"peak {r['peak_memory_gib']:.1f} GiB",
            flush=True,
        )
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"label": label, "largest_pairs_per_step": largest, "runs": results}


def scoring_and_sampling(shape: str, prompt: int, response: int) -> dict:
    model = build(shape, torch.bfloat16, False).eval()
    pairs = synthetic_pairs(256, prompt, response, model.config.vocab_size)
    score_pairs(model, pairs[:32], 32, 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    score_pairs(model, pairs, 32, 0)
    torch.cuda.synchronize()
    scoring = time.perf_counter() - start
    prompts = [list(p.prompt_ids) for p in pairs[:64]]
    g = torch.Generator(device="cuda").manual_seed(0)
    generate(model, prompts[:4], max_new_tokens=4, generator=g)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=128, temperature=1.0, generator=g)
    torch.cuda.synchronize()
    sampling = time.perf_counter() - start
    new_tokens = sum(len(o) for o in out)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "scoring_pairs_per_s": len(pairs) / scoring,
        "scoring_tokens_per_s": len(pairs) * 2 * (prompt + response) / scoring,
        "sampling_new_tokens_per_s": new_tokens / sampling,
        "sampling_batch": len(prompts),
    }


def decoding_vs_transformers(shape: str, workload: DecodeWorkload, device: str = "cuda") -> dict:
    """Greedy decoding in bf16, ours against transformers' generate on one random checkpoint of
    `shape` (written to a temporary directory in the Hugging Face layout, loaded by both sides):
    the same tokens, new tokens/s of each, and our decode steps against the bandwidth bound."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # model_config(shape) as transformers reads it; generate wants a pad id, the rows have none.
    config = LlamaConfig(**model_config(shape).to_hf(), pad_token_id=0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(torch.bfloat16)  # transformers' init: std 0.02
    with tempfile.TemporaryDirectory(prefix="ropo-decode-") as work_dir:
        hf.save_pretrained(work_dir)
        del hf
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        result = run_decoding(Path(work_dir), workload, 2, torch.bfloat16, device)
    ours = result["sides"]["ours"]
    result["targets"] = {  # issue #17: >= 8k new tokens/s at batch 64, >= 60% of the bound
        "new_tokens_per_s": {"value": ours["new_tokens_per_s"], "target": 8000},
        "share_of_bound": {"value": ours["share_of_bound"], "target": 0.6},
    }
    return result


def precision_check(shape: str, prompt: int, response: int) -> dict:
    """How far bf16 log-probs fall from fp32 ones: summed response log-probs and DPO margins."""
    model = build(shape, torch.float32, False).eval()
    pairs = synthetic_pairs(64, prompt, response, model.config.vocab_size, seed=1)
    exact = score_pairs(model, pairs, 16, 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = score_pairs(model, pairs, 16, 0)
    pure = score_pairs(model.to(torch.bfloat16), pairs, 16, 0)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    margin = lambda logps: logps.chosen - logps.rejected  # noqa: E731
    result = {}
    for name, other in (("autocast_bf16", mixed), ("bf16_weights", pure)):
        result[name] = {
            "max_abs_logp_diff": (other.chosen - exact.chosen).abs().max().item(),
            "mean_abs_logp": exact.chosen.abs().mean().item(),
            "max_abs_margin_diff": (margin(other) - margin(exact)).abs().max().item(),
        }
    return result


def transformers_baseline(
    shape: str, pairs_per_step: int, prompt: int, response: int, steps: int
) -> dict:
    """A TRL-style DPO step on transformers' LlamaForCausalLM: full logits, log_softmax over
    every position, gather, mask (what TRL's concatenated forward does), bf16 autocast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model_config(shape)
    hf_config = LlamaConfig(
        **{
            k: v
            for k, v in cfg.to_hf().items()
            if k not in ("architectures", "torch_dtype", "dtype")
        }
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    pairs = synthetic_pairs(pairs_per_step * (steps + 2), prompt, response, cfg.vocab_size)
    batches = []
    for i in range(0, len(pairs), pairs_per_step):  # collated before timing, as on our side
        rows = [list(p.prompt_ids + p.chosen_ids) for p in pairs[i : i + pairs_per_step]] + [
            list(p.prompt_ids + p.rejected_ids) for p in pairs[i : i + pairs_per_step]
        ]
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device="cuda")
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            mask[r, prompt : len(row)] = 1
        batches.append((ids, mask))

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        ids, mask = batch
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids).logits
        logps = logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        logps = (logps * mask[:, 1:]).sum(-1)
        B = pairs_per_step
        loss = -torch.nn.functional.logsigmoid(0.1 * (logps[:B] - logps[B:] + 0.0)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = median_step(step, batches, warmup=2)
    result = {
        "pairs_per_step": pairs_per_step,
        "seconds_per_step": seconds,
        "tokens_per_s": 2 * pairs_per_step * (prompt + response) / seconds,
        "peak_memory_gib": peak,
    }
    model = optimizer = None  # freed before empty_cache (step still refers to both names)
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/_work")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", default="peak,decode,1b,baseline,precision,7b,score")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    steps = 3 if args.quick else 5
    prompt, response = 256, 256
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "prompt_tokens": prompt,
        "response_tokens": response,
    }

    def save() -> None:
        (out / "gpu_results.json").write_text(json.dumps(results, indent=1))

    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak(torch.bfloat16)
    results["bf16_matmul_peak_tflops"] = peak / 1e12
    results["fp32_matmul_peak_tflops"] = matmul_peak(torch.float32, reps=5) / 1e12
    print(
        f"measured peak: bf16 {peak / 1e12:.0f} TFLOP/s, "
        f"fp32 {results['fp32_matmul_peak_tflops']:.0f} TFLOP/s",
        flush=True,
    )
    save()
    if "decode" in sections:
        new = 64 if args.quick else 256
        workload = DecodeWorkload(batch=64, prompt_tokens=prompt, new_tokens=new)
        try:
            results["7b_decoding"] = decoding_vs_transformers("7b", workload)
        except Exception as err:  # noqa: BLE001  (a failure here must not lose the rest)
            results["7b_decoding"] = {"error": repr(err)}
        print("7b decoding:", json.dumps(results["7b_decoding"].get("sides")), flush=True)
        save()
    if "1b" in sections:
        results["1b_bf16_mixed"] = sweep_batches(
            "1b",
            torch.float32,
            torch.bfloat16,
            False,
            [4, 8, 16, 32],
            prompt,
            response,
            steps,
            peak,
        )
        save()
        results["1b_bf16_mixed_ckpt"] = sweep_batches(
            "1b", torch.float32, torch.bfloat16, True, [16, 32, 64], prompt, response, steps, peak
        )
        save()
    if "baseline" in sections:
        try:
            results["1b_transformers_trl_style"] = transformers_baseline(
                "1b", 8, prompt, response, steps
            )
            print(
                "transformers TRL-style 1b, 8 pairs:",
                results["1b_transformers_trl_style"],
                flush=True,
            )
        except Exception as err:  # noqa: BLE001  (a baseline failure must not lose the rest)
            results["1b_transformers_trl_style"] = {"error": repr(err)}
        save()
    if "precision" in sections:
        results["1b_precision"] = precision_check("1b", prompt, response)
        print("1b precision:", results["1b_precision"], flush=True)
        save()
    if "7b" in sections:
        results["7b_bf16_weights_ckpt"] = sweep_batches(
            "7b", torch.bfloat16, None, True, [1, 2, 4, 8, 16], prompt, response, steps, peak
        )
        save()
    if "lora" in sections:
        results["7b_lora16_fp32_autocast_ckpt"] = sweep_batches(
            "7b",
            torch.float32,
            torch.bfloat16,
            True,
            [4, 8, 16, 32],
            prompt,
            response,
            steps,
            peak,
            lora_rank=16,
        )
        save()
    if "score" in sections:
        results["7b_scoring_sampling"] = scoring_and_sampling("7b", prompt, response)
        print("7b scoring/sampling:", results["7b_scoring_sampling"], flush=True)
        save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
