"""The constraint task (src/ropo_constraints): checkers on hand-written answers, the gold reward's
arithmetic, seeded prompts, pairs, the bootstrap, and the whole pipeline on a tiny random Llama
(fast) and on SmolLM2-135M-Instruct (slow: a real model on CPU, LoRA, a few dozen pairs).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from ropo.config_load import load_settings
from ropo.data import load_pairs
from ropo.generate_prompts import read_prompts as read_generate_prompts
from ropo_constraints.constraints import (
    Constraint,
    closeness,
    count_sentences,
    gold_reward,
    satisfied,
    words,
)
from ropo_constraints.evaluate import bootstrap_ci, summarise_cell
from ropo_constraints.pairs import build_pairs, write_pairs
from ropo_constraints.pipeline import main, run_task
from ropo_constraints.prompts import (
    PromptSpec,
    compatible,
    make_prompts,
    read_prompts,
    write_prompts,
)
from ropo_constraints.settings import ConstraintSettings


def test_words_and_sentences_are_counted_as_a_reader_would() -> None:
    assert words("Don't stop, it's a well-known fact!") == [
        "Don't", "stop", "it's", "a", "well-known", "fact",
    ]  # fmt: skip
    assert count_sentences("Hi there. How are you? Fine") == 3
    assert count_sentences("Version 2.5 is out... Really!") == 2  # "2.5" ends nothing
    assert count_sentences("  ") == 0


# (constraint, an answer that obeys it, one that does not)
CASES = [
    (Constraint("exact_words", 5), "The sea is very big.", "The sea is big."),
    (Constraint("max_words", 4), "Sleep eight hours.", "Sleep at least eight hours daily."),
    (Constraint("lowercase"), "the moon is round, 42 times.", "The moon is round."),
    (Constraint("include_word", "waves"), "Waves crash on rocks.", "The wave crashes."),
    (Constraint("exclude_word", "water"), "Rain falls from clouds.", "Rain is water."),
    (Constraint("ends_with_question"), "Rain falls. Why? ", "Why does rain fall? Nobody knows."),
    (Constraint("n_sentences", 2), "Cats purr. Cats sleep!", "Cats purr. Cats sleep. Cats eat."),
    (Constraint("starts_with", "honestly"), "Honestly, cats rule.", "Cats, honestly, rule."),
    (Constraint("no_commas"), "Cats purr and sleep.", "Cats purr, sleep."),
]


@pytest.mark.parametrize("constraint, obeys, breaks", CASES, ids=[c[0].kind for c in CASES])
def test_each_checker_accepts_its_positive_and_refuses_its_negative(
    constraint: Constraint, obeys: str, breaks: str
) -> None:
    assert satisfied(constraint, obeys) and closeness(constraint, obeys) == 1.0
    assert not satisfied(constraint, breaks) and 0 <= closeness(constraint, breaks) < 1
    # no words, no credit: not even for "do not use the word X" or "no commas"
    assert not satisfied(constraint, "  ... ") and closeness(constraint, "") == 0.0


def test_closeness_shrinks_with_the_distance_from_the_target() -> None:
    seven = "one two three four five six seven"
    assert closeness(Constraint("exact_words", 5), seven) == 1 / 3  # 2 words off: 1 / (1 + 2)
    assert closeness(Constraint("max_words", 14), " ".join([seven] * 4)) == 14 / 28
    assert closeness(Constraint("lowercase"), "Hello world") == 9 / 10  # 9 of 10 letters
    assert closeness(Constraint("exclude_word", "rain"), "Rain, rain, go away") == 1 / 3
    assert closeness(Constraint("no_commas"), "a, b") == 1 / 2
    assert closeness(Constraint("n_sentences", 1), "A. B. C.") == 1 / 3


def test_gold_reward_worked_example() -> None:
    asked = (Constraint("exact_words", 5), Constraint("lowercase"))
    # 7 lowercase words: lowercase obeyed, 2 words off the 5 asked (closeness 1/3), so
    # 0.9 * (1 obeyed of 2) + 0.1 * (1/3 + 1) / 2 = 0.45 + 0.0667 = 0.5167
    assert gold_reward(asked, "the sea is very big and blue") == pytest.approx(0.45 + 0.2 / 3)
    assert gold_reward(asked, "the sea is very big") == 1.0
    assert gold_reward(asked, "") == 0.0
    # obeying one more constraint outweighs any closeness on the others
    assert gold_reward(asked, "the sea is very big and blue") > gold_reward(asked, "The sea!")


def test_constraint_values_are_checked() -> None:
    for kind, value in [("exact_words", 0), ("exact_words", "5"), ("lowercase", 3),
                        ("include_word", "two words"), ("starts_with", "yes!")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"constraint '{kind}' takes"):
            Constraint(kind, value)
    with pytest.raises(ValueError, match="unknown constraint kind 'shout'"):
        Constraint("shout")


def test_prompts_are_seeded_distinct_and_obeyable() -> None:
    train, heldout = make_prompts(300, 60, seed=3)
    assert (train, heldout) == make_prompts(300, 60, seed=3)
    assert make_prompts(300, 10, seed=3)[0] == train  # train prompts ignore the held-out count
    assert make_prompts(300, 60, seed=4)[0] != train
    texts = [spec.text for spec in train + heldout]
    assert len(set(texts)) == len(texts)  # so no held-out prompt is a training prompt
    assert [s.id for s in heldout[:2]] == ["heldout-00000", "heldout-00001"]
    for spec in train + heldout:
        assert 1 <= len(spec.constraints) <= 2 and compatible(spec.constraints)
    assert not compatible((Constraint("exact_words", 5), Constraint("max_words", 9)))
    assert not compatible((Constraint("include_word", "sun"), Constraint("exclude_word", "sun")))


def test_prompt_files_are_read_back_by_us_and_by_ropo_generate(tmp_path: Path) -> None:
    specs = make_prompts(5, 1, seed=0)[0]
    path = tmp_path / "prompts.jsonl"
    write_prompts(specs, path)
    assert read_prompts(path) == specs
    records = read_generate_prompts(path, multi_turn=False).records
    assert [(r.id, r.messages[-1]["content"]) for r in records] == [(s.id, s.text) for s in specs]
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"prompt": "', '"prompt": "Please. ')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'prompt' does not match")):
        read_prompts(path)


def test_pairs_take_the_best_and_the_worst_sample_and_skip_ties(tmp_path: Path) -> None:
    specs = [
        PromptSpec("a", "Describe a cat.", (Constraint("no_commas"),)),
        PromptSpec("b", "Describe a cat.", (Constraint("lowercase"),)),
    ]
    responses = [
        ["Cats, cats, cats.", "Cats purr.", "Cats, purr."],  # closeness 1/3, 1, 1/2
        ["cats purr.", "cats sleep."],  # both obey: a tie, no pair
    ]
    records, stats = build_pairs(specs, responses)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in records] == [
        ("a", "Cats purr.", "Cats, cats, cats.")
    ]
    assert (stats.prompts, stats.pairs, stats.skipped_ties, stats.chosen_obeys_all) == (2, 1, 1, 1)
    # worst reward: 0.9 * 0 + 0.1 * 1/3; the mean is over all five samples
    assert stats.mean_rejected_reward == pytest.approx(0.1 / 3)
    assert stats.mean_reward == pytest.approx((0.1 / 3 + 1 + 0.05 + 1 + 1) / 5)
    write_pairs(records, tmp_path / "pairs.jsonl")
    pairs, report = load_pairs(tmp_path / "pairs.jsonl", format="plain")
    assert report.used == 1 and pairs[0].id == "a" and pairs[0].chosen == "Cats purr."


def test_bootstrap_interval_of_a_mean() -> None:
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25)
    coin = [0.0, 1.0] * 50  # mean 0.5, standard error 0.05: the interval is about 0.5 ± 0.1
    low, high = bootstrap_ci(coin)
    assert 0.38 < low < 0.43 and 0.57 < high < 0.62
    assert bootstrap_ci(coin) == (low, high)  # a fixed seed: reports are reproducible


def test_a_cell_averages_each_prompt_over_seeds() -> None:
    runs = [
        {"mean": 0.5, "obeys_all": 0.5, "per_prompt": [1.0, 0.0]},
        {"mean": 0.0, "obeys_all": 0.0, "per_prompt": [0.0, 0.0]},
    ]
    cell = summarise_cell(runs)
    assert cell["mean"] == 0.25 and cell["seeds"] == 2 and cell["obeys_all"] == 0.25
    assert cell["seed_sd"] == pytest.approx(math.sqrt(0.125))  # sd of 0.5 and 0 (n - 1)
    assert cell["ci_low"] == 0.0 and cell["ci_high"] == 0.5  # per prompt: 0.5 and 0


def test_settings_lists_are_parsed_and_checked() -> None:
    words = ["out=x", "noise=0,0.25", "seeds=3", "methods=ropo"]
    s = load_settings(ConstraintSettings, words, "test")
    assert (s.noise, s.seeds, s.methods) == ((0.0, 0.25), (3,), ("ropo",))
    for word, message in [
        ("noise=0.1,0.5", "'noise' = 0.5 must be >= 0.0 and < 0.5"),
        ("seeds=1,1", "'seeds' = '1,1' must list distinct values"),
        ("seeds=", "'seeds' = '' must list distinct values, at least one"),
        ("seeds=a", "'seeds' expects int values separated by commas, got 'a'"),
        ("methods=dpo,ipo", "ipo not among dpo, ropo, ropo_auto"),
        ("k=1", "'k' = 1 must be >= 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_settings(ConstraintSettings, ["out=x", word], "test")
    with pytest.raises(ValueError, match="'out' is required"):
        load_settings(ConstraintSettings, [], "test")


def test_a_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["out=x", "lora_rnak=4"]) == 2
    assert capsys.readouterr().err == (
        "ropo_constraints: error: command line 'lora_rnak=4': unknown key 'lora_rnak' (did you "
        "mean 'lora_rank'?); `python -m ropo_constraints --help` lists them all\n"
    )


def tiny_settings(out: Path, model: str, template: str) -> ConstraintSettings:
    """Every stage at a size that runs in seconds on a tiny random model."""
    words = [f"out={out}", f"model={model}", f"template={template}", "device=cpu",
             "n_train_prompts=12", "n_heldout_prompts=4", "k=3", "max_new_tokens=8",
             "noise=0.25", "seeds=0", "lora_rank=2", "rounds=2", "rho=0.25", "batch_size=4",
             "lr=1e-3", "max_length=256"]  # fmt: skip
    return load_settings(ConstraintSettings, words, "test")


def test_the_pipeline_on_a_tiny_model_and_a_rerun_that_skips_it_all(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    s = tiny_settings(tmp_path / "out", str(tiny_model_dir), "plain")
    summary = run_task(s)
    out = Path(s.out)
    for name in ("prompts_train.jsonl", "prompts_heldout.jsonl", "samples_train.jsonl",
                 "pairs_train.jsonl", "eval/instruct.jsonl", "summary.json", "report.md",
                 "runs/noise0.25-seed0/ropo/final/config.json",
                 "eval/noise0.25-seed0/dpo.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    samples = [json.loads(line) for line in (out / "samples_train.jsonl").read_text().splitlines()]
    assert len(samples) == 12 * 3
    pairs = summary["pairs"]
    assert pairs["pairs"] + pairs["skipped_ties"] == 12 and pairs["pairs"] > 0
    assert [(c["method"], c["noise"], c["seeds"]) for c in summary["cells"]] == [
        ("dpo", 0.25, 1), ("ropo", 0.25, 1), ("ropo_auto", 0.25, 1),
    ]  # fmt: skip
    for row in [summary["instruct"], *summary["cells"]]:
        assert 0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1
    ropo_run = next(run for run in summary["runs"] if run["method"] == "ropo")
    assert ropo_run["last_round"]["round"] == 2
    auto_run = next(run for run in summary["runs"] if run["method"] == "ropo_auto")
    assert auto_run["last_round"]["rho_used"] == auto_run["last_round"]["noise_estimate"]
    report = (out / "report.md").read_text()
    assert "| ROPO | 0.25 |" in report and "| instruct model (start) | - |" in report
    capsys.readouterr()
    again = run_task(s)
    printed = capsys.readouterr().out
    assert "running" not in printed and printed.count("up to date, skipped") == 10
    assert again["cells"] == summary["cells"]
    run_task(replace(s, rho=0.5))  # only ROPO reads rho: its run and evaluation alone rerun
    printed = capsys.readouterr().out
    assert re.findall(r"\[(\S+)\] running", printed) == [
        "train/noise0.25-seed0/ropo", "eval/noise0.25-seed0/ropo",
    ]  # fmt: skip


# Sized for a few minutes on two CPU cores: every stage on the real model, no evidence about
# DPO or ROPO (docs/real_model.md).
SMOLLM2_TINY = [
    "model=smollm2-135m", "template=auto", "device=cpu", "n_train_prompts=12",
    "n_heldout_prompts=4", "k=3", "max_new_tokens=16", "gen_batch_size=36", "noise=0.2",
    "seeds=0", "lora_rank=4", "rounds=1", "batch_size=8", "lr=5e-4", "max_length=128",
]  # fmt: skip


@pytest.mark.slow
def test_smollm2_tiny_run_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_dir: Path
) -> None:
    """The real model through every stage: its own samples, pairs, DPO and ROPO with LoRA."""
    monkeypatch.setenv("MODELS_DIR", str(smollm2_dir.parent))  # the preset, converted once
    out = tmp_path / "out"
    assert main([f"out={out}", *SMOLLM2_TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"]["pairs"] >= 4  # the samples differ: most prompts give a pair
    sample = json.loads((out / "samples_train.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].endswith("<|im_start|>assistant\n")  # the model's own template
    answers = (out / "eval" / "instruct.jsonl").read_text().splitlines()
    answers = [json.loads(line)["output"] for line in answers]
    assert sum(len(words(answer)) >= 3 for answer in answers) >= 3  # real text, not noise
    ropo_run = next(run for run in summary["runs"] if run["method"] == "ropo")
    assert ropo_run["last_round"]["n_dropped"] > 0
    for row in [summary["instruct"], *summary["cells"]]:
        assert 0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1
