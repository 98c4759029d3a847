"""What both sides of the benchmark share: the tiny models, the synthetic pairs, the FLOP count.

The parent process writes each model once as a Hugging Face checkpoint directory; TRL loads it
with `from_pretrained`, we load it with `ropo.models.load_model`, so both start from the same
weights. The pairs are random token ids with fixed lengths (no padding), one BOS, one EOS.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ropo.data import TokenizedPair

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# The training settings both sides share: AdamW at a constant lr, no warm-up, clipping at 1.
LR, BETA, MAX_GRAD_NORM = 1e-5, 0.1, 1.0
BASE = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "tie_word_embeddings": False,
}
VARIANTS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    # SmolLM2-135M's shape (its config.json; head size 576 / 9 = 64), random weights.
    "smollm2": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
    },
}


@dataclass(frozen=True)
class Workload:
    """The synthetic training set: `num_pairs` pairs, `pairs_per_step` of them per step."""

    num_pairs: int = 64
    pairs_per_step: int = 8
    prompt_tokens: int = 64
    response_tokens: int = 64
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        """Tokens through the network per step: chosen and rejected rows, prompt included."""
        return 2 * self.pairs_per_step * (self.prompt_tokens + self.response_tokens)


# A real model's shape at lengths a 2-core CPU steps through in seconds; 3 steps for the guard.
WORKLOADS = {
    "smollm2": Workload(num_pairs=12, pairs_per_step=4, prompt_tokens=128, response_tokens=128)
}


def workload_of(variant: str) -> Workload:
    """The workload a variant is timed on: the toy shapes share the default one."""
    return WORKLOADS.get(variant, Workload())


def vocab_of(variant: str) -> int:
    return (BASE | VARIANTS[variant])["vocab_size"]


def write_model(out: Path, variant: str, seed: int = 0) -> Path:
    """Save a randomly initialised transformers Llama (fp32, HF layout) to `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM  # only the parent needs transformers

    torch.manual_seed(seed)
    config = LlamaConfig(**(BASE | VARIANTS[variant]), attn_implementation="sdpa")
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def make_pairs(workload: Workload, vocab: int = BASE["vocab_size"]) -> list[TokenizedPair]:
    """Random pairs: BOS + prompt, responses ending in EOS; chosen and rejected always differ."""
    generator = torch.Generator().manual_seed(workload.seed)

    def draw(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab, (n,), generator=generator).tolist())

    pairs = []
    for i in range(workload.num_pairs):
        prompt = (BOS_ID, *draw(workload.prompt_tokens - 1))
        chosen = (*draw(workload.response_tokens - 1), EOS_ID)
        rejected = (*draw(workload.response_tokens - 1), EOS_ID)
        pairs.append(TokenizedPair(f"pair-{i:04d}", prompt, chosen, rejected))
    return pairs


def step_batches(pairs: list[TokenizedPair], pairs_per_step: int) -> list[list[TokenizedPair]]:
    """The pairs in order, cut into steps; both sides see the same batches in the same order."""
    return [pairs[s : s + pairs_per_step] for s in range(0, len(pairs), pairs_per_step)]


def model_flops_per_step(model_dir: Path, workload: Workload, shared_prompt: bool) -> float:
    """FLOPs one fwd+bwd step needs in a layout: 6 per weight per token, causal attention, head.

    Counted: every body matmul at every token the layout computes (6 FLOPs per weight per token:
    forward 2, backward 4); attention scores and values for the (query, key) pairs the mask
    allows; the LM head only at the positions that predict a response token. Embedding lookups,
    norms, recomputation and the optimizer count as zero. Layouts: two rows per pair, prompt
    + response each (TRL), or one row [prompt | chosen | rejected] (ours, `shared_prompt`).
    """
    hf = json.loads((model_dir / "config.json").read_text())
    C, L, V = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    H, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    D = C // H
    body = L * (C * H * D + 2 * C * K * D + H * D * C + 3 * C * hf["intermediate_size"])
    B, P, R = workload.pairs_per_step, workload.prompt_tokens, workload.response_tokens
    causal = lambda n: n * (n + 1) // 2  # noqa: E731  (query, key) pairs of n causal tokens
    if shared_prompt:
        tokens, key_pairs = B * (P + 2 * R), B * (causal(P) + 2 * (R * P + causal(R)))
    else:
        tokens, key_pairs = 2 * B * (P + R), 2 * B * causal(P + R)
    attention = 3 * L * 4 * H * D * key_pairs  # q.k and p.v: 2 FLOPs x D per head, x3 fwd+bwd
    head = 6 * V * C * 2 * B * R
    return float(6 * body * tokens + attention + head)


def matmul_peak(size: int = 2048, seconds: float = 2.0) -> float:
    """The best fp32 GFLOP/s of square `size` torch.mm calls over about `seconds` seconds."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):  # warm-up: thread pool and caches
        torch.mm(a, b)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - tick) / 1e9)
    return best


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds since boot of the whole machine and of this process (all its threads).

    Their growth over a stretch of time, less ours, is what other processes took meanwhile.
    """
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    machine = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
    own = [int(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13]]
    return machine / tick, sum(own) / tick
