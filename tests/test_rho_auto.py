"""rho=auto (the flip rate estimated from the margins) and last_round=restart (a fresh policy
trained with plain DPO on the kept pairs in the last round)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import ropo.train as train_module
from conftest import read_jsonl
from ropo.cli import main
from ropo.config import FilterSettings
from ropo.config_load import load_config
from ropo.filter import estimate_flip_rate, keep_count
from ropo.filter.noise_rate import MAX_ESTIMATE
from ropo.models import load_model
from ropo.step import learning_rate, planned_steps, restarts, round_epochs, steps_to_go
from test_train import run, run_args

# ---- the estimator ---------------------------------------------------------------------------


def test_estimate_reads_the_negative_share_of_the_confident_half() -> None:
    # 10 pairs: the confident half is |Δ| in {10, 9, 8, 7, 6}, two of them negative.
    margins = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -0.5, -0.4, 0.3, -0.2, 0.1])
    assert estimate_flip_rate(margins) == pytest.approx(2 / 5)
    # the unsure half, whatever its signs, does not count
    margins[5:] = -margins[5:].abs()
    assert estimate_flip_rate(margins) == pytest.approx(2 / 5)
    margins[5:] = torch.tensor([-0.5, 0.4, 0.3, 0.2, 0.1])
    assert estimate_flip_rate(margins, confident_share=1.0) == pytest.approx(3 / 10)


def test_estimate_is_zero_on_clean_margins_and_for_an_untrained_policy() -> None:
    assert estimate_flip_rate(torch.linspace(0.1, 3.0, 50)) == 0.0
    assert estimate_flip_rate(torch.zeros(20)) == 0.0  # step 0: Δ = 0 everywhere


def test_estimate_recovers_symmetric_noise_on_separable_margins() -> None:
    generator = torch.Generator().manual_seed(0)
    true_margins = 1.0 + torch.rand(4000, generator=generator)  # every true preference is clear
    flipped = torch.rand(4000, generator=generator) < 0.3
    observed = torch.where(flipped, -true_margins, true_margins)
    assert estimate_flip_rate(observed) == pytest.approx(flipped.float().mean().item(), abs=0.03)


def test_estimate_is_capped_below_one_half_and_checks_its_input() -> None:
    assert estimate_flip_rate(-torch.ones(10)) == MAX_ESTIMATE < 0.5
    with pytest.raises(ValueError, match="finite"):
        estimate_flip_rate(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="no margins"):
        estimate_flip_rate(torch.tensor([]))
    with pytest.raises(ValueError, match="confident_share"):
        estimate_flip_rate(torch.ones(3), confident_share=0.0)


# ---- config and schedule ---------------------------------------------------------------------


def test_rho_takes_a_share_or_auto_and_restart_needs_two_rounds() -> None:
    assert load_config(None, ["rho=auto"]).filter.rho == "auto"
    assert load_config(None, ["rho=0.3"]).filter.rho == 0.3
    with pytest.raises(ValueError, match="'rho'.*or auto"):
        load_config(None, ["rho=sometimes"])
    with pytest.raises(ValueError, match="'rho'"):
        load_config(None, ["rho=1.5"])
    with pytest.raises(ValueError, match="'last_round'"):
        load_config(None, ["last_round=again"])
    with pytest.raises(ValueError, match="rounds >= 2"):
        FilterSettings(rounds=1, last_round="restart")


def test_a_restarted_last_round_gets_its_own_schedule_and_epochs() -> None:
    cfg = load_config(
        None,
        ["rounds=3", "epochs=1", "batch_size=10", "last_round=restart", "last_round_epochs=3"],
    )
    assert [round_epochs(cfg, r) for r in range(3)] == [1, 1, 3]
    assert [restarts(cfg, r) for r in range(3)] == [False, False, True]
    # rounds 1-2 share one schedule over all 100 pairs; round 3 has one over its 60 pairs
    assert planned_steps(100, 100, 0, cfg) == planned_steps(100, 70, 1, cfg) == 2 * 10
    assert planned_steps(100, 60, 2, cfg) == 3 * 6
    continued = load_config(None, ["rounds=3", "epochs=1", "batch_size=10"])
    assert planned_steps(100, 60, 2, continued) == 3 * 10
    auto = load_config(None, ["rounds=2", "rho=auto", "batch_size=10", "last_round_epochs=2"])
    assert steps_to_go(100, 100, 0, 0, 0, auto) == 10 + 2 * 10  # later rounds: as many pairs


# ---- through the training loop ---------------------------------------------------------------

AUTO_RESTART = ("loss=ropo", "rounds=2", "rho=auto", "noise=0.25", "last_round=restart",
                "last_round_epochs=2", "warmup_ratio=0.25", "save_every=100")  # fmt: skip


def test_auto_rho_drops_the_estimate_and_the_last_round_restarts(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = run(tiny_model_dir, tiny_pairs_file, tmp_path / "run", *AUTO_RESTART)
    metrics = read_jsonl(out / "metrics.jsonl")
    for line in metrics:
        assert line["rho_used"] == line["noise_estimate"]
        assert line["n_kept"] == keep_count(line["n_pairs"], line["noise_estimate"])
    # The round-1 checkpoint holds the fresh policy of round 2: the starting model's weights.
    start = load_model(tiny_model_dir).state_dict()
    restarted = load_model(out / "checkpoints" / "round-1").state_dict()
    for name, value in start.items():
        assert torch.equal(restarted[name], value), name
    # Round 2's learning rate warms up again from its own first step.
    cfg = load_config(None, run_args(tiny_model_dir, tiny_pairs_file, out, *AUTO_RESTART))
    log = read_jsonl(out / "train_log.jsonl")
    first_of_round_2 = next(line for line in log if line["round"] == 2)
    round_1_steps = sum(line["round"] == 1 for line in log)
    n_kept = metrics[0]["n_kept"]
    schedule = planned_steps(len(log), n_kept, 1, cfg)  # round 2 trains on the kept pairs
    expected = learning_rate(first_of_round_2["step"] - 1 - round_1_steps, schedule, cfg.optim)
    assert first_of_round_2["step"] == round_1_steps + 1
    assert first_of_round_2["lr"] == pytest.approx(expected)
    assert expected == pytest.approx(cfg.optim.lr / int(0.25 * schedule))  # warm-up step 1


def test_fixed_rho_records_the_estimate_but_drops_rho(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = run(tiny_model_dir, tiny_pairs_file, tmp_path / "run", "loss=ropo", "rounds=1",
              "rho=0.25", "noise=0.25")  # fmt: skip
    (line,) = read_jsonl(out / "metrics.jsonl")
    assert line["rho_used"] == 0.25 and 0 <= line["noise_estimate"] <= MAX_ESTIMATE
    assert line["n_kept"] == keep_count(line["n_pairs"], 0.25)


def test_a_run_interrupted_in_the_restarted_round_resumes_to_the_same_weights(
    tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (*AUTO_RESTART[:-1], "save_every=3")
    full = run(tiny_model_dir, tiny_pairs_file, tmp_path / "full", *args)
    round_1_steps = sum(line["round"] == 1 for line in read_jsonl(full / "train_log.jsonl"))

    real_step, calls = train_module.train_step, {"n": 0}

    def crash_in_round_2(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == round_1_steps + 4:  # after round 2's first step-checkpoint
            raise KeyboardInterrupt("simulated crash")
        return real_step(*a, **k)

    monkeypatch.setattr(train_module, "train_step", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tiny_pairs_file, tmp_path / "broken", *args)
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", f"resume={tmp_path / 'broken'}"]) == 0

    expected = load_model(full / "final").state_dict()
    for name, value in load_model(tmp_path / "broken" / "final").state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert (tmp_path / "broken" / "metrics.jsonl").read_text() == (
        full / "metrics.jsonl"
    ).read_text()


@pytest.mark.parametrize("score", ["margin", "preference"])
def test_the_w_step_drops_the_lowest_scores_of_the_chosen_filter_score(
    score: str, tiny_model_dir: Path, tiny_pairs_file: Path, tmp_path: Path
) -> None:
    out = run(tiny_model_dir, tiny_pairs_file, tmp_path / "run", "loss=ropo", "rounds=1",
              "rho=0.25", "noise=0.25", f"filter_score={score}")  # fmt: skip
    records = read_jsonl(out / "pairs.jsonl")

    def value(record: dict) -> float:
        if score == "margin":
            return record["margin"]
        return record["policy_chosen_logp"] - record["policy_rejected_logp"]

    ranked = sorted(records, key=lambda r: (value(r), r["id"]))
    n_drop = len(records) - keep_count(len(records), 0.25)
    assert {r["id"] for r in records if not r["kept"]} == {r["id"] for r in ranked[:n_drop]}
    # the two scores rank differently here, so the test tells them apart
    by_margin = sorted(records, key=lambda r: (r["margin"], r["id"]))[:n_drop]
    by_preference = sorted(
        records, key=lambda r: (r["policy_chosen_logp"] - r["policy_rejected_logp"], r["id"])
    )[:n_drop]
    assert {r["id"] for r in by_margin} != {r["id"] for r in by_preference}
