"""LoRA adapters: a no-op at the start, merged exactly, the only trained parameters, saved as HF.

The unit tests use a tiny random Llama from model_fixtures; the end-to-end test trains through the
command line and loads the result with our loader and with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_fixtures import load_hf, max_diff, our_model, random_ids
from ropo.checkpoint import latest_checkpoint, load_adapters, save_checkpoint
from ropo.cli import main
from ropo.config import OptimSettings
from ropo.config_load import load_config
from ropo.models import load_model, save_model
from ropo.models.lora import LoRALinear, apply_lora, has_lora, merge_lora, merged_weights
from ropo.step import make_optimizer

ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def lora_model(targets: list[str] = ALL, rank: int = 4, alpha: float = 8.0) -> torch.nn.Module:
    return apply_lora(our_model(), rank, alpha, targets, seed=0)


def randomize_b_(model: torch.nn.Module) -> None:
    """Give every B a nonzero value, as training would (B starts at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def test_zero_b_leaves_the_logits_unchanged() -> None:
    ids = random_ids(2, 12)
    plain = our_model()(ids)
    adapted = lora_model()
    assert isinstance(adapted.layers[1].feed_forward.w2, LoRALinear)
    assert adapted.layers[0].attention.wq.lora_a.abs().sum() > 0  # A is random, B is zero
    assert torch.equal(adapted(ids), plain)  # x W^T + 0: bit for bit


def test_merge_gives_the_unmerged_logits_and_plain_parameters(tmp_path: Path) -> None:
    ids = random_ids(2, 12)
    model = lora_model(targets=["wq", "wv", "w2"])
    randomize_b_(model)
    unmerged = model(ids)
    assert max_diff(unmerged, our_model()(ids)) > 1e-3  # the adapters do change the network
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    merge_lora(model)
    assert not has_lora(model)
    assert set(model.state_dict()) == set(our_model().state_dict())
    assert max_diff(model(ids), unmerged) < 1e-5
    # The state-dict form (used for weights gathered from several processes) agrees exactly.
    folded = merged_weights(weights, scale=8.0 / 4)
    for name, value in model.state_dict().items():
        assert torch.equal(folded[name], value), name
    save_model(model, tmp_path)  # plain HF layout: no adapter names left to rename
    assert max_diff(load_model(tmp_path)(ids), unmerged) < 1e-5


def test_only_the_adapters_train() -> None:
    model = lora_model(targets=["wq", "w1"])
    model.train()
    model(random_ids(2, 12)).float().logsumexp(-1).mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    adapters = {f"layers.{i}.{m}.{a}" for i in range(2) for m in ("attention.wq", "feed_forward.w1")
                for a in ("lora_a", "lora_b")}  # fmt: skip
    assert with_grad == adapters
    optimizer = make_optimizer(model, OptimSettings(lr=1e-3))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in model.named_parameters() if name in adapters}


def test_lora_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="lora_targets"):
        load_config(None, ["lora_targets=wq,q_proj"])
    with pytest.raises(ValueError, match="lora_rank"):
        load_config(None, ["lora_rank=-1"])
    with pytest.raises(ValueError, match="lora_alpha"):
        load_config(None, ["lora_alpha=0"])


def test_adapters_resume_only_on_their_base_model(tmp_path: Path) -> None:
    model = lora_model()
    optimizer = make_optimizer(model, OptimSettings(lr=1e-3))
    state = {"loop": {}, "config": {}, "base_model_sha256": "aaa"}
    path = save_checkpoint(tmp_path, "step-0000001", model, optimizer, state)
    assert sorted(p.name for p in path.iterdir() if "safetensors" in p.name) == [
        "lora.safetensors",  # the adapters only: the frozen base stays in the model directory
        "optimizer.safetensors",
        "rng.safetensors",
    ]
    assert latest_checkpoint(tmp_path) == path
    with pytest.raises(ValueError, match="base model with sha256 aaa"):
        load_adapters(lora_model(), path, base_sha256="bbb")
    with pytest.raises(ValueError, match="lora_rank or lora_targets"):
        load_adapters(lora_model(targets=["wq"]), path, base_sha256="aaa")
    randomize_b_(model)
    fresh = lora_model()
    load_adapters(fresh, path, base_sha256="aaa")  # B is still zero in the checkpoint
    assert torch.equal(fresh.layers[0].attention.wq.lora_a, model.layers[0].attention.wq.lora_a)


def test_lora_run_saves_a_plain_hugging_face_model(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    args = [f"model={tiny_model_dir}", f"data={tiny_pairs_file}", f"out={out}", "loss=dpo",
            "rounds=1", "rho=0", "batch_size=16", "lr=3e-2", "warmup_ratio=0", "max_length=64",
            "log_every=1", "lora_rank=4", "lora_alpha=8", "lora_targets=wq,wv,w2",
            "device=cpu"]  # fmt: skip
    assert main(["train", *args]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    final, base = load_model(out / "final"), load_model(tiny_model_dir)
    assert set(final.state_dict()) == set(base.state_dict())  # no adapter names left
    for name, value in base.state_dict().items():
        adapted = any(f"{target}.weight" in name for target in ("wq", "wv", "w2"))
        assert torch.equal(final.state_dict()[name], value) != adapted, name  # only targets moved
    checkpoint = latest_checkpoint(out)
    assert (checkpoint / "lora.safetensors").is_file() and not (checkpoint / "config.json").exists()
    ids = random_ids(2, 10, vocab=final.config.vocab_size)
    with torch.no_grad():
        ours = final(ids)
    assert max_diff(load_hf(out / "final")(input_ids=ids).logits, ours) < 1e-4
