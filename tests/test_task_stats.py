"""The built-in task's methods, sweep settings and statistics on hand-made numbers: the `ropo
train` keys of every method, the sweep's plan, the paired bootstrap of stats.py, and the sweep
table with methods that were not run. No model is trained here (test_task.py does that)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from ropo.config_load import build_config, load_settings
from ropo_builtin.methods import method_keys
from ropo_builtin.pipeline import sweep_plan
from ropo_builtin.runs import PlannedRun
from ropo_builtin.settings import COMMAND, METHOD_LABELS, TaskSettings
from ropo_builtin.stats import (
    Resamples,
    draw_resamples,
    mean_interval,
    paired_difference,
    recovered_share,
    resampled_means,
)
from ropo_builtin.sweep_stats import sweep_statistics
from ropo_builtin.tables import filtering_table, sweep_findings, sweep_table
from ropo_constraints.settings import ConstraintSettings
from ropo_constraints.stages import train_keys


def test_every_method_is_a_valid_ropo_train_run() -> None:
    s = TaskSettings(rounds=3, epochs_per_round=2, alpha=8.0)
    for method in METHOD_LABELS:  # every key must be one `ropo train` accepts
        build_config(method_keys(method, s, 0.4))
    dpo_like = {"rounds": 1, "rho": 0.0, "epochs": 6}  # rounds * epochs_per_round epochs
    assert method_keys("dpo", s, 0.4) == {"loss": "dpo", **dpo_like}
    assert method_keys("ipo", s, 0.4) == {"loss": "ipo", **dpo_like}
    # the oracle baselines are told ε = η; the _half ones η/2
    assert method_keys("cdpo", s, 0.4) == {"loss": "cdpo", "label_smoothing": 0.4, **dpo_like}
    for method, noise, loss, epsilon in [
        ("cdpo_half", 0.4, "cdpo", 0.2),
        ("rdpo", 0.2, "rdpo", 0.2),
        ("rdpo_half", 0.2, "rdpo", 0.1),
    ]:
        keys = method_keys(method, s, noise)
        assert (keys["loss"], keys["label_smoothing"]) == (loss, epsilon), method
    assert method_keys("ropo", s, 0.4) == {
        "loss": "ropo",
        "alpha": 8.0,
        "rounds": 3,
        "rho": 0.2,
        "epochs": 2,
    }
    auto = build_config(method_keys("ropo_auto", s, 0.4))
    assert (auto.loss.loss, auto.loss.alpha, auto.filter.rounds) == ("ropo", 8.0, 2)
    assert (auto.filter.rho, auto.filter.last_round) == ("auto", "restart")
    assert (auto.optim.epochs, auto.filter.last_round_epochs) == (2, 6)  # the restart: DPO's 6
    assert auto.filter.filter_score == "preference"
    margin = method_keys("ropo_auto_margin", s, 0.4)
    assert margin == {**method_keys("ropo_auto", s, 0.4), "filter_score": "margin"}


def test_the_constraint_task_runs_the_same_recipes() -> None:
    s = ConstraintSettings(out="x", rounds=3, epochs=2, alpha=8.0)
    task = TaskSettings(rounds=3, epochs_per_round=2, alpha=8.0)
    for method in ("dpo", "ropo", "ropo_auto"):
        keys = train_keys(s, Path("x"), method, 0.2, 1, Path("x/run"))
        assert keys.items() >= method_keys(method, task, 0.2).items(), method
        build_config(keys)


def test_sweep_settings_from_words_and_their_checks() -> None:
    words = ["sweep=true", "sweep_seeds=3,4", "sweep_noises=0,0.25", "sweep_methods=dpo,rdpo"]
    settings = load_settings(TaskSettings, [*words, "jobs=3"], COMMAND)
    assert (settings.sweep_seeds, settings.sweep_noises) == ((3, 4), (0.0, 0.25))
    assert settings.sweep_methods == ("dpo", "rdpo") and settings.jobs == 3 and settings.sweep
    yaml_list = load_settings(TaskSettings, ["sweep_noises=[0, 0.25]", "sweep_seeds=5"], COMMAND)
    assert (yaml_list.sweep_noises, yaml_list.sweep_seeds) == ((0.0, 0.25), (5,))  # or one value
    with pytest.raises(
        ValueError, match="'sweep_seeds' expects int values separated by commas, got '1,x'"
    ):
        load_settings(TaskSettings, ["sweep_seeds=1,x"], COMMAND)
    with pytest.raises(ValueError, match="'sweep_methods'.*must include dpo"):
        TaskSettings(sweep_methods=("ropo",))
    with pytest.raises(ValueError, match="not dpo_clean"):
        TaskSettings(sweep_methods=("dpo", "dpo_clean"))
    with pytest.raises(ValueError, match="'sweep_seeds' = '1,1' must list distinct values"):
        TaskSettings(sweep_seeds=(1, 1))
    with pytest.raises(ValueError, match="'sweep_noises' = 0.5 must be"):
        TaskSettings(sweep_noises=(0.0, 0.5))
    with pytest.raises(ValueError, match="'jobs' = 0"):
        TaskSettings(jobs=0)
    # a direct run of an ε = η method at noise 0 would be plain DPO under another name
    with pytest.raises(ValueError, match="cdpo,rdpo_half at noise=0, where ε = 0"):
        TaskSettings(methods=("dpo", "cdpo", "rdpo_half"), noise=0.0)


def test_the_sweep_plan_skips_the_smoothed_baselines_at_noise_0_and_says_so() -> None:
    s = TaskSettings(
        sweep_seeds=(0, 1), sweep_noises=(0.0, 0.4), sweep_methods=("dpo", "cdpo", "ipo")
    )
    plan, skipped = sweep_plan(s)
    assert plan == [  # seed by seed, so that a sweep stopped part-way has whole seeds
        PlannedRun("dpo", 0.0, 0),
        PlannedRun("dpo", 0.4, 0),
        PlannedRun("cdpo", 0.4, 0),
        PlannedRun("ipo", 0.4, 0),
        PlannedRun("dpo", 0.0, 1),
        PlannedRun("dpo", 0.4, 1),
        PlannedRun("cdpo", 0.4, 1),
        PlannedRun("ipo", 0.4, 1),
    ]
    assert skipped == [
        {"method": "cdpo", "noise": 0.0, "reason": "ε = 0: plain DPO"},
        {"method": "ipo", "noise": 0.0, "reason": "not in sweep_clean_methods"},
    ]
    with_ipo = sweep_plan(dataclasses.replace(s, sweep_clean_methods=("dpo", "ipo")))[0]
    assert PlannedRun("ipo", 0.0, 1) in with_ipo


def test_resampled_means_weight_each_seed_and_prompt_by_how_often_it_was_drawn() -> None:
    rewards = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]])  # S = 2 seeds, P = 3 prompts
    # resample 1 draws every seed and prompt once: the plain mean, 36 / 6 = 6
    # resample 2 draws seed 1 twice and prompts (0, 0, 2): (10 + 10 + 12) * 2 / 6 = 32 / 3
    resamples = Resamples(
        torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64),
        torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]], dtype=torch.float64),
    )
    assert resampled_means(rewards, resamples).tolist() == pytest.approx([6.0, 32 / 3])
    drawn = draw_resamples(3, 50, resamples=100, seed=7)
    assert drawn.seed_counts.shape == (100, 3) and drawn.prompt_counts.shape == (100, 50)
    assert (drawn.seed_counts.sum(1) == 3).all() and (drawn.prompt_counts.sum(1) == 50).all()
    assert torch.equal(drawn.prompt_counts, draw_resamples(3, 50, 100, seed=7).prompt_counts)


def _rewards(n_seeds: int, n_prompts: int, seed: int) -> torch.Tensor:
    return torch.rand(n_seeds, n_prompts, generator=torch.Generator().manual_seed(seed))


def test_paired_difference_finds_a_clear_gain_and_no_gain_where_there_is_none() -> None:
    baseline = _rewards(3, 300, seed=0)  # prompts differ a lot: rewards spread over [0, 1]
    jitter = 0.02 * (_rewards(3, 300, seed=1) - 0.5)
    resamples = draw_resamples(3, 300)
    gain = paired_difference(baseline + 0.05 + jitter, baseline, resamples)
    assert gain.low < 0.05 < gain.high and gain.low > 0  # contains the truth, excludes 0
    assert gain.estimate == pytest.approx(0.05, abs=0.002)
    # pairing is what makes it clear: the same gain against an unrelated baseline is not
    other = mean_interval(baseline + 0.05 + jitter, resamples)
    assert other.half_width > 10 * gain.half_width
    same = paired_difference(baseline + jitter, baseline, resamples)
    assert same.low < 0 < same.high


def test_recovered_share_is_the_gain_over_the_damage() -> None:
    noisy = _rewards(2, 40, seed=2)
    clean = noisy + 0.2  # the noise cost DPO 0.2 on every prompt
    half = recovered_share(noisy + 0.1, noisy, clean, draw_resamples(2, 40))
    # (0.1) / (0.2) on every prompt and seed: every resample gives 0.5
    assert (half.estimate, half.low, half.high) == pytest.approx((0.5, 0.5, 0.5))
    assert recovered_share(noisy, noisy, noisy - 0.1, draw_resamples(2, 40)) is None  # no damage
    # damage 0.01 on average but ±1 per prompt: many resamples see none (their share counts as
    # +inf, as the gain is > 0), so the interval has no upper end
    swing = torch.tensor([[1.01, -0.99] * 20, [0.99, -0.97] * 20])
    wide = recovered_share(noisy + 0.005, noisy, noisy + swing, draw_resamples(2, 40))
    assert wide.estimate == pytest.approx(0.5) and wide.to_dict()["high"] is None
    assert 0 < wide.low < 0.5


def _run(method: str, noise: float, seed: int, rewards: list[float], **round1: Any) -> dict:
    first = {"round": 1, "n_pairs": 10, "n_flipped": int(10 * noise), "n_dropped": 0}
    first |= {"drop_precision": None, "drop_recall": None, "noise_estimate": None}
    return {
        "method": method,
        "label": METHOD_LABELS[method],
        "noise": noise,
        "seed": seed,
        "prompt_rewards": rewards,
        "rounds": [first | round1],
    }


def _sweep() -> dict[str, Any]:
    """Two seeds, four prompts; DPO loses 0.4 to noise, ROPO (rho=auto) gets 0.3 of it back."""
    runs = []
    for seed in (0, 1):
        clean = [0.9, 0.8, 0.9, 0.8]
        noisy = [r - 0.4 for r in clean]
        dropped = {"n_dropped": 4, "drop_precision": 0.75, "drop_recall": 0.75}
        runs += [
            _run("dpo", 0.0, seed, clean),
            _run("ropo_auto", 0.0, seed, [r - 0.01 * (seed + 1) for r in clean]),
            _run("dpo", 0.4, seed, noisy),
            _run("cdpo", 0.4, seed, [r + 0.001 * (-1) ** seed for r in noisy]),
            _run("ropo_auto", 0.4, seed, [r + 0.3 for r in noisy], noise_estimate=0.35, **dropped),
        ]
    skipped = [{"method": "cdpo", "noise": 0.0, "reason": "ε = 0: plain DPO"}]
    return {"runs": runs, "skipped": skipped, "statistics": sweep_statistics(runs)}


def test_sweep_statistics_pair_each_method_with_dpo_of_the_same_noise_and_seed() -> None:
    cells = {(c["method"], c["noise"]): c for c in _sweep()["statistics"]}
    auto = cells[("ropo_auto", 0.4)]
    assert auto["gold_reward"]["estimate"] == pytest.approx(0.85 - 0.4 + 0.3)
    assert auto["vs_dpo"]["estimate"] == pytest.approx(0.3) and auto["beats_dpo"]
    assert auto["recovered"]["estimate"] == pytest.approx(0.3 / 0.4)
    assert auto["filtering"][0]["noise_estimate"] == 0.35
    assert auto["filtering"][0]["dropped_share"] == 0.4
    assert not cells[("cdpo", 0.4)]["beats_dpo"]  # +0.001 on one seed, -0.001 on the other
    clean_auto = cells[("ropo_auto", 0.0)]  # at η = 0: the cost of ROPO on clean data
    assert clean_auto["vs_dpo"]["estimate"] == pytest.approx(-0.015)
    assert clean_auto["vs_dpo"]["high"] < 0 and clean_auto["recovered"] is None
    assert cells[("dpo", 0.4)]["vs_dpo"] is None and cells[("dpo", 0.4)]["filtering"] == []


def test_the_sweep_table_shows_skipped_methods_and_marks_clear_gains() -> None:
    sweep = _sweep()
    table = sweep_table(sweep).splitlines()
    assert table[0] == (
        "| method | η=0 gold reward | η=0 Δ vs DPO | η=0 recovered | η=0.4 gold reward "
        "| η=0.4 Δ vs DPO | η=0.4 recovered |"
    )
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table[2:]}
    assert list(rows) == ["DPO", "ROPO (rho=auto)", "cDPO (ε = η)"]
    assert rows["cDPO (ε = η)"].startswith("| cDPO (ε = η) | (ε = 0: plain DPO) | - | - | 0.450")
    assert "+0.300 [+0.300, +0.300] ✓ | 75% [75%, 75%] |" in rows["ROPO (rho=auto)"]
    # the baseline has no Δ of its own; its ± is the prompts' spread (0.9 and 0.8, equal shares)
    assert rows["DPO"] == "| DPO | 0.850 ± 0.050 | - | - | 0.450 ± 0.050 | - | - |"
    findings = sweep_findings(sweep)
    assert findings[1] == (
        "η = 0.4: ahead of DPO with 95% confidence: ROPO (rho=auto) (+0.300); "
        "no clear difference from DPO: cDPO (ε = η) (+0.000)."
    )
    assert "| ROPO (rho=auto) | 0.4 | 1 | 0.400 | 0.350 | 0.400 | 0.750 | 0.750 |" in (
        filtering_table(sweep)
    )
