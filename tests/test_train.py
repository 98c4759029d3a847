"""End-to-end runs of the training loop on a tiny random model and tiny synthetic pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ropo.train as train_module
from conftest import read_jsonl
from ropo import ref_cache
from ropo.cli import main
from ropo.config_load import load_config
from ropo.data import load_pairs, tokenize_pairs
from ropo.filter.weights import keep_count
from ropo.models import load_model, load_tokenizer
from ropo.train import train

AUDIT_FIELDS = {
    "id",
    "round",
    "policy_chosen_logp",
    "policy_rejected_logp",
    "ref_chosen_logp",
    "ref_rejected_logp",
    "margin",
    "loss",
    "weight",
    "kept",
    "flipped",
}


def run_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={model_dir}",
        f"data={data}",
        f"out={out}",
        "batch_size=8",
        "lr=3e-3",
        "warmup_ratio=0",
        "max_length=64",
        "log_every=1",
        *extra,
    ]


def run(model_dir: Path, data: Path, out: Path, *extra: str) -> Path:
    """train() with run_args' settings and `extra` on top; returns the run directory."""
    return train(load_config(None, run_args(model_dir, data, out, *extra)))


def test_ropo_run_writes_the_documented_audit(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run(
        tiny_model_dir,
        tiny_pairs_file,
        out,
        *"loss=ropo rounds=3 rho=0.25 noise=0.25 epochs=2".split(),
    )
    records = read_jsonl(out / "pairs.jsonl")
    flips = json.loads((out / "flips.json").read_text())
    n = len(flips)
    assert n == 48 and 0 < sum(flips.values()) < n
    assert len(records) == 3 * n
    for record in records:
        assert set(record) >= AUDIT_FIELDS
        assert record["flipped"] == flips[record["id"]]
        assert record["kept"] == (record["weight"] == 1.0)
    for round_number in (1, 2, 3):  # rounds count from 1 in every file
        kept = [r for r in records if r["round"] == round_number and r["kept"]]
        assert len(kept) == keep_count(n, 0.25) == 36
        dropped_losses = [
            r["loss"] for r in records if r["round"] == round_number and not r["kept"]
        ]
        assert min(dropped_losses) >= max(r["loss"] for r in kept)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2, 3]
    for key in ("drop_precision", "drop_recall", "flip_auroc", "reward_accuracy"):
        assert key in metrics[-1]
    cleaned, _ = load_pairs(out / "cleaned.jsonl")
    assert len(cleaned) == 36
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["loss"] == "ropo" and info["data_fingerprint"]
    assert load_model(out / "final").config.vocab_size == 300
    assert (out / "final" / "tokenizer.model").is_file()


def test_training_lowers_the_loss(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dpo"
    run(
        tiny_model_dir,
        tiny_pairs_file,
        out,
        *"loss=dpo rounds=1 rho=0 epochs=5 schedule=constant beta=0.5".split(),
    )
    log = read_jsonl(out / "train_log.jsonl")
    assert abs(log[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 0
    assert log[0]["reward_accuracy"] == 0.0  # ties count as wrong
    last_epoch = [record["loss"] for record in log[-6:]]
    assert sum(last_epoch) / 6 < 0.5 * math.log(2)
    final_round = read_jsonl(out / "metrics.jsonl")[-1]
    assert final_round["loss_mean"] < 0.5 * math.log(2)
    assert final_round["reward_accuracy"] > 0.8  # from 0.0 at the start


def test_dpo_through_the_loop_equals_a_plain_dpo_loop(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    """loss=dpo rounds=1 rho=0, full batch, constant lr: the same weights as DPO written out."""
    out = tmp_path / "loop"
    full_batch = "batch_size=48 schedule=constant max_grad_norm=0 beta=0.5"
    run(
        tiny_model_dir,
        tiny_pairs_file,
        out,
        *f"loss=dpo rounds=1 rho=0 epochs=3 {full_batch}".split(),
    )
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs, _ = tokenize_pairs(load_pairs(tiny_pairs_file)[0], tokenizer, 64)
    policy, reference = load_model(tiny_model_dir), load_model(tiny_model_dir)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)

    def logp(model: torch.nn.Module, prompt: tuple, response: tuple) -> torch.Tensor:
        ids = torch.tensor([list(prompt + response)])
        token_logps = model(ids)[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        return token_logps[len(prompt) - 1 :].gather(1, targets[len(prompt) - 1 :, None]).sum()

    with torch.no_grad():
        ref = [
            (
                logp(reference, p.prompt_ids, p.chosen_ids),
                logp(reference, p.prompt_ids, p.rejected_ids),
            )
            for p in pairs
        ]
    for _ in range(3):
        losses = []
        for pair, (ref_chosen, ref_rejected) in zip(pairs, ref, strict=True):
            margin = (logp(policy, pair.prompt_ids, pair.chosen_ids) - ref_chosen) - (
                logp(policy, pair.prompt_ids, pair.rejected_ids) - ref_rejected
            )
            losses.append(-F.logsigmoid(0.5 * margin))
        torch.stack(losses).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    ours = load_model(out / "final").state_dict()
    for name, value in policy.state_dict().items():
        assert torch.allclose(ours[name], value, atol=2e-5), name


def test_interrupted_run_resumes_to_the_same_weights(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("loss=ropo", "rounds=2", "rho=0.25", "noise=0.2", "epochs=2", "save_every=3")
    full = tmp_path / "full"
    run(tiny_model_dir, tiny_pairs_file, full, *args)

    broken = tmp_path / "broken"
    real_step, calls = train_module.train_step, {"n": 0}

    def crash_on_step_10(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == 10:  # round 2, after the step-9 checkpoint
            raise KeyboardInterrupt("simulated crash")
        return real_step(*a, **k)

    monkeypatch.setattr(train_module, "train_step", crash_on_step_10)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tiny_pairs_file, broken, *args)
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", f"resume={broken}"]) == 0

    expected = load_model(full / "final").state_dict()
    for name, value in load_model(broken / "final").state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert (broken / "pairs.jsonl").read_text() == (full / "pairs.jsonl").read_text()
    assert (broken / "cleaned.jsonl").read_text() == (full / "cleaned.jsonl").read_text()
    assert len(read_jsonl(broken / "train_log.jsonl")) == len(read_jsonl(full / "train_log.jsonl"))


def test_reference_cache_is_reused_and_invalidated(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    loads = {"n": 0}
    real_load = ref_cache.load_model

    def counting_load(*a: object, **k: object) -> object:
        loads["n"] += 1
        return real_load(*a, **k)

    monkeypatch.setattr(ref_cache, "load_model", counting_load)
    common = ("loss=dpo", "rounds=1", "rho=0", f"cache_dir={cache}")
    run(tiny_model_dir, tiny_pairs_file, tmp_path / "a", *common)
    run(tiny_model_dir, tiny_pairs_file, tmp_path / "b", *common)
    assert loads["n"] == 1  # the second run read the cache
    run(tiny_model_dir, tiny_pairs_file, tmp_path / "c", *common, "max_length=48")
    assert loads["n"] == 2  # other truncation, other token ids: recomputed, not stale
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_rejection_sampling_adds_pairs_for_dropped_prompts(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rs"
    run(
        tiny_model_dir,
        tiny_pairs_file,
        out,
        *"loss=ropo rounds=2 rho=0.25 rejection_sampling=true rs_k=3 rs_max_new_tokens=6".split(),
    )
    sampled = read_jsonl(out / "sampled_pairs.jsonl")
    dropped = {
        r["id"] for r in read_jsonl(out / "pairs.jsonl") if r["round"] == 1 and not r["kept"]
    }
    assert sampled and len(sampled) <= len(dropped)
    for record in sampled:
        source = record["id"].split("@rs")[0]
        assert source in dropped and record["chosen_ids"] != record["rejected_ids"]


def test_cli_reports_bad_data_with_file_and_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    args = [f"model={tiny_model_dir}", f"data={data}", f"out={tmp_path}/o", "max_length=64"]
    assert main(["train", *args]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_missing_presets_say_where_to_put_the_weights_and_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    assert main(["train", "model=llama2-7b", "data=ultrafeedback", f"out={tmp_path}/o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ropo: error: 2 inputs are missing:\n(1) model preset 'llama2-7b'")
    assert "Llama-2-7b-sft" in err and "config.json" in err and "MODELS_DIR" in err
    assert "SFT" in err and "ropo sft model=" in err  # a base model is not where ROPO starts
    assert "\n(2) data preset 'ultrafeedback'" in err and "DATA_DIR" in err
