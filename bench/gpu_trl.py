"""TRL's DPOTrainer against our DPO step on one GPU: the 1B shape, bf16 autocast, fp32 weights.

    PYTHONPATH=src:bench python3 bench/gpu_trl.py --out bench/_work
The GPU machine reaches no registry: install TRL and its dependencies there from wheels first
(docs/performance.md gives the commands). The CPU benchmark's TRL side (`trl_side.py`) is reused
as is, with the GPU instead of the CPU and bf16 autocast on both sides. The sides run one after
the other, each in a fresh model and optimizer, so each peak memory is its own.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
from fixtures import BETA, LR, MAX_GRAD_NORM, PAD_ID, Workload
from gpu_measure import median_step, model_config, synthetic_pairs
from trl_side import build_trainer, trl_examples, trl_step

from ropo.config import OptimSettings
from ropo.data import TokenizedPair
from ropo.loss import get_loss
from ropo.models import load_model
from ropo.ref_cache import reference_logps
from ropo.step import StepSettings, make_optimizer, train_step


def write_checkpoint(out: Path) -> Path:
    """A random 1B-shape LlamaForCausalLM in HF layout, fp32, for both sides to load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**model_config("1b").to_hf(), attn_implementation="sdpa")
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def trl_side(model_dir: Path, pairs: list[TokenizedPair], workload: Workload, warmup: int) -> dict:
    trainer = build_trainer(model_dir, pairs, workload, device="cuda")
    examples = trl_examples(trainer, pairs)
    n = workload.pairs_per_step
    batches = [examples[i : i + n] for i in range(0, len(examples), n)]
    seconds, peak = median_step(lambda batch: trl_step(trainer, batch), batches, warmup)
    chosen_ref = torch.tensor([e["ref_chosen_logps"] for e in examples[:n]])
    return {"seconds_per_step": seconds, "peak_memory_gib": peak, "ref_chosen": chosen_ref}


def our_side(model_dir: Path, pairs: list[TokenizedPair], workload: Workload, warmup: int) -> dict:
    n = workload.pairs_per_step
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = reference_logps(
            model_dir, pairs, model_dir / "ropo-cache", 2 * n, PAD_ID, device="cuda"
        )
    model = load_model(model_dir, dtype=torch.float32, device="cuda").train()
    optimizer = make_optimizer(model, OptimSettings(lr=LR, weight_decay=0.0))
    settings = StepSettings(PAD_ID, MAX_GRAD_NORM, torch.device("cuda"), torch.bfloat16)
    loss_fn = get_loss("dpo", beta=BETA)
    batches = [pairs[i : i + n] for i in range(0, len(pairs), n)]
    step = lambda batch: train_step(model, optimizer, [batch], ref, loss_fn, LR, settings)  # noqa: E731
    seconds, peak = median_step(step, batches, warmup)
    return {
        "seconds_per_step": seconds,
        "peak_memory_gib": peak,
        "ref_chosen": ref.logps.chosen[:n],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/_work")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warmup, prompt, response = 2, 256, 256
    n = args.pairs_per_step
    workload = Workload(n * (warmup + args.steps), n, prompt, response)
    model_dir = write_checkpoint(out / "trl-1b-model")
    pairs = synthetic_pairs(workload.num_pairs, prompt, response, model_config("1b").vocab_size)
    results = {}
    for name, side in (("trl", trl_side), ("ours", our_side)):
        results[name] = side(model_dir, pairs, workload, warmup)
        gc.collect()
        torch.cuda.empty_cache()
    tokens = 2 * n * (prompt + response)  # the same data tokens for both sides
    ref_gap = (results["trl"].pop("ref_chosen") - results["ours"].pop("ref_chosen")).abs().max()
    import trl

    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "pairs_per_step": n,
        "tokens_per_step": tokens,
        **{f"{k}_{m}": v[m] for k, v in results.items() for m in v},
        "trl_tokens_per_s": tokens / results["trl"]["seconds_per_step"],
        "ours_tokens_per_s": tokens / results["ours"]["seconds_per_step"],
        "speedup": results["trl"]["seconds_per_step"] / results["ours"]["seconds_per_step"],
        "memory_ratio": results["ours"]["peak_memory_gib"] / results["trl"]["peak_memory_gib"],
        "max_reference_logp_gap_bf16": float(ref_gap),
    }
    (out / "gpu_trl.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
