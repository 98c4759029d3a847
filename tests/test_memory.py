"""The memory estimate worked out by hand for Llama-2-7B (resources.py), the refusal, and the
reference model that training does not keep.

Llama-2-7B: vocab V = 32000, width C = 4096, MLP width M = 11008, 32 layers, untied head.
    embeddings + head   2 * V * C                          =   262,144,000
    one layer           4 C^2 + 3 C M + 2 C                =   202,383,360
    all                 262,144,000 + 32 * 202,383,360 + C = 6,738,415,616 parameters
In bf16 that is 13,476,831,232 bytes (13.5 GB) of weights.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from ropo import ref_cache, resources
from ropo.config_load import load_config
from ropo.data import load_pairs, tokenize_pairs
from ropo.models import load_tokenizer
from ropo.models.config import ModelConfig, read_model_config
from ropo.resources import check_fits, check_memory, lora_params, training_bytes

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
N = 6_738_415_616
BF16_WEIGHTS = 2 * N  # 13,476,831,232 bytes
# Per token and layer a block keeps 14 C + 5 M = 57,344 + 55,040 = 112,384 values.
PER_TOKEN_BLOCK = 14 * 4096 + 5 * 11008


def seven_b() -> ModelConfig:
    return ModelConfig.from_hf(LLAMA2_7B)


def test_seven_b_full_fine_tuning_needs_four_copies_of_the_weights() -> None:
    assert seven_b().num_params() == N
    # batch 8 pairs of 1024 tokens with checkpointing: 2 * 8 * 1024 = 16,384 tokens kept as
    # block inputs (C each, 32 layers) plus one block recomputed at a time.
    cfg = load_config(None, ["dtype=bfloat16", "activation_checkpointing=true",
                             "batch_size=8", "max_length=1024"])  # fmt: skip
    need = training_bytes(seven_b(), cfg)
    assert need["weights"] == BF16_WEIGHTS == 13_476_831_232
    assert need["gradients"] == BF16_WEIGHTS
    assert need["adamw_moments"] == 2 * BF16_WEIGHTS
    inputs = 16_384 * 4096 * 32 * 2  # 4,294,967,296
    one_block = 16_384 * PER_TOKEN_BLOCK * 2  # 3,682,598,912
    assert need["activations"] == inputs + one_block == 7_977_566_208
    assert sum(need.values()) == 4 * BF16_WEIGHTS + 7_977_566_208  # 61.9 GB: fits an 80 GB H100
    # Without checkpointing every block keeps its activations: 32 * 3.68 GB = 118 GB.
    plain = training_bytes(seven_b(), load_config(None, ["dtype=bfloat16", "max_length=1024"]))
    assert plain["activations"] == 32 * one_block == 117_843_165_184


def test_seven_b_lora_needs_the_weights_and_little_more() -> None:
    # r = 16 on all seven projections: r * (fan_in + fan_out) summed over one layer is
    # 16 * (4 * 8192 + 3 * 15104) = 16 * 78,080, times 32 layers = 39,976,960 adapter parameters.
    assert lora_params(seven_b(), 16, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]) == 39_976_960
    cfg = load_config(None, ["dtype=bfloat16", "lora_rank=16", "activation_checkpointing=true",
                             "batch_size=8", "max_length=1024"])  # fmt: skip
    need = training_bytes(seven_b(), cfg)
    assert need["weights"] == BF16_WEIGHTS + 2 * 39_976_960  # 13.56 GB
    assert need["gradients"] == 2 * 39_976_960  # 80 MB: only the adapters have gradients
    assert need["adamw_moments"] == 4 * 39_976_960  # 160 MB
    # 13.48 GB of base weights + 4 * 80 MB for the adapters, their gradients and moments
    assert sum(need.values()) - need["activations"] == BF16_WEIGHTS + 8 * 39_976_960


def test_fsdp_divides_what_it_shards() -> None:
    # 8 processes: weights, gradients and moments / 8; each process takes 8 / 8 = 1 pair of a
    # micro-batch (2,048 tokens); the root (embeddings, head, final norm: 262,148,096
    # parameters) and two gathered blocks (2 * 202,383,360) are whole: 1,333,829,632 bytes.
    cfg = load_config(None, ["dtype=bfloat16", "activation_checkpointing=true",
                             "batch_size=8", "max_length=1024"])  # fmt: skip
    need = training_bytes(seven_b(), cfg, world_size=8)
    assert need["weights"] == BF16_WEIGHTS // 8 == 1_684_603_904
    assert need["adamw_moments"] == 2 * BF16_WEIGHTS // 8
    assert need["activations"] == 2_048 * 4096 * 32 * 2 + 2_048 * PER_TOKEN_BLOCK * 2
    assert need["fsdp_unsharded"] == 2 * (262_148_096 + 2 * 202_383_360) == 1_333_829_632


def test_a_run_that_cannot_fit_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "Llama-2-7b-hf"  # config.json is all the estimate reads
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA2_7B))
    monkeypatch.setattr(resources, "available_bytes", lambda device: 40 * 2**30)
    full = load_config(None, ["dtype=bfloat16", "activation_checkpointing=true"])
    config = read_model_config(model_dir)
    with pytest.raises(MemoryError, match=r"needs|lora_rank=16") as error:
        check_memory(config, full, torch.device("cpu"), model_dir)
    assert "weights 12.55" in str(error.value) and "has 40.0 GiB free" in str(error.value)
    lora = load_config(None, ["dtype=bfloat16", "activation_checkpointing=true", "lora_rank=16"])
    # 12.63 GiB of weights + 0.22 GiB for the adapters + 3.71 GiB of activations (512 tokens)
    estimate = check_memory(config, lora, torch.device("cpu"), model_dir)
    assert estimate.startswith("memory estimate: 16.6")
    assert "per process (8 processes)" in check_memory(
        config, full, torch.device("cpu"), model_dir, world_size=8
    )


def test_the_reference_model_is_freed_after_scoring(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training never holds the reference: its log-probs are cached, and nothing keeps it alive."""
    loaded = []
    real_load = ref_cache.load_model

    def remember(*args: object, **kwargs: object) -> torch.nn.Module:
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(ref_cache, "load_model", remember)
    pairs, _ = tokenize_pairs(load_pairs(tiny_pairs_file)[0], load_tokenizer(tiny_model_dir), 64)
    ref = ref_cache.reference_logps(tiny_model_dir, pairs, tmp_path, 16, pad_id=0)
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None
    assert ref.logps.chosen.shape == (48,) and not ref.logps.chosen.requires_grad


def test_max_length_and_lora_rank_must_fit_the_model(tmp_path: Path) -> None:
    # Llama-2-7B: 4096 positions, and every projection is at least C = 4096 wide on each side;
    # with grouped-query attention wk and wv are narrower.
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B | {"max_position_embeddings": 4096}))

    def check(*overrides: str) -> None:
        check_fits(read_model_config(tmp_path), load_config(None, list(overrides)), tmp_path)

    check("max_length=4096", "lora_rank=4096")
    with pytest.raises(ValueError, match=r"'max_length' = 4097 .* max_position_embeddings = 4096"):
        check("max_length=4097")
    with pytest.raises(ValueError, match=r"'lora_rank' = 4097 .* hidden_size = 4096 \("):
        check("lora_rank=4097")
    gqa = LLAMA2_7B | {"num_key_value_heads": 8}  # wk, wv: 4096 -> 8 * 128 = 1024
    (tmp_path / "config.json").write_text(json.dumps(gqa))
    with pytest.raises(ValueError, match=r"num_key_value_heads \* head_dim = 1024"):
        check("lora_rank=1025")
    check("lora_rank=1025", "lora_targets=wq,wo,w1,w2,w3")
