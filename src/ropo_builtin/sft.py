"""Stage 2 of the built-in pipeline: a tiny Llama trained from scratch on the task demonstrations.

In: the task's prompts and demonstrations and the tokenizer trained on them. The stage writes a
seeded random model directory (<out>/sft_init) and the demonstrations as {prompt, response}
records (<out>/sft_data.jsonl), then runs `ropo sft` on them (sft.py, the library function, not
a subprocess). Out: the run directory <out>/sft, whose final/ is the SFT model that samples the
preference pairs and serves as the frozen reference of every preference run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ropo.config_load import build_config
from ropo.jsonl import read_jsonl
from ropo.models import ModelConfig, Tokenizer, Transformer, save_model
from ropo.sft import sft
from ropo.sft_config import SftConfig
from ropo_builtin.settings import TaskSettings


def tiny_llama_config(
    tokenizer: Tokenizer, dim: int, n_layers: int, n_heads: int, max_positions: int = 64
) -> ModelConfig:
    """A Llama config sized for the task. The vocabulary is exactly the tokenizer's: a padded
    embedding could sample ids that sentencepiece cannot decode."""
    if dim % n_heads != 0:
        raise ValueError(f"dim={dim} is not a multiple of n_heads={n_heads}")
    return ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=dim // n_heads,
        intermediate_size=4 * dim,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=max_positions,
        sliding_window=None,
        tie_word_embeddings=False,
        architecture="LlamaForCausalLM",
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )


def write_initial_model(
    config: ModelConfig, tokenizer: Tokenizer, seed: int, model_dir: Path
) -> None:
    """A model directory `ropo sft` starts from: weights drawn with torch seeded by `seed`
    (models/llama.py's initialisation), config.json and the task's tokenizer.model."""
    torch.manual_seed(seed)
    save_model(Transformer(config), model_dir)
    shutil.copy(tokenizer.model_file, model_dir / "tokenizer.model")


def write_demonstrations(prompts: list[str], responses: list[str], path: Path) -> None:
    """The demonstrations as {"id", "prompt", "response"} records. The ids keep a demonstration
    that the task drew twice as two examples (without ids, `ropo sft` would skip the repeat)."""
    with open(path, "w", encoding="utf-8") as file:
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            record = {"id": f"sft-{i:05d}", "prompt": prompt, "response": response}
            file.write(json.dumps(record) + "\n")


def train_sft(
    s: TaskSettings, init_dir: Path, data_file: Path, run_dir: Path, max_length: int
) -> list[float]:
    """`ropo sft` from `init_dir` on `data_file` into `run_dir` (started over each time) with the
    task's SFT settings; returns the loss of every step (mean NLL per response token).

    AdamW with weight decay 0.01, 5% warm-up then cosine decay, gradients clipped at norm 1;
    the examples are drawn in a seeded order, epoch after epoch, for `sft_steps` steps.
    """
    keys = {
        "model": str(init_dir),
        "data": str(data_file),
        "out": str(run_dir),
        "overwrite": True,  # the stage runs again only when its inputs changed: start over
        "template": "plain",  # the task's prompts are plain text
        "max_length": max_length,
        "steps": s.sft_steps,
        "batch_size": s.sft_batch_size,
        "lr": s.sft_lr,
        "weight_decay": 0.01,
        "warmup_ratio": 0.05,
        "seed": s.seed,
        "device": s.device,
    }
    sft(build_config(keys, config=SftConfig))
    return [record["loss"] for record in read_jsonl(run_dir / "metrics.jsonl")]
