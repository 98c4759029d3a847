"""`ropo eval` and the metrics of evaluate.py.

The end-to-end tests train a tiny DPO run with `ropo train`, then run `ropo eval` on its final/
and check its numbers against an independent computation: transformers' AutoModelForCausalLM on
both model directories, response log-probs summed by hand from the same token ids.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import read_jsonl, write_synthetic_pairs
from ropo.data import load_pairs, tokenize_pairs
from ropo.eval_config import EvalSettings, load_eval_settings
from ropo.evaluate import heldout_metrics, per_pair_records, wilson_interval
from ropo.logps import PairLogps
from ropo.models import load_tokenizer

# A tiny DPO run (the settings of tests/test_faults.py RUN, one round, no filter); beta and
# max_length differ from ropo eval's defaults, so that taking them from run.json shows.
TRAIN = ("loss=dpo", "rounds=1", "rho=0", "batch_size=4", "lr=3e-3", "warmup_ratio=0",
         "max_length=48", "beta=0.5", "log_every=1", "device=cpu")  # fmt: skip


def ropo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m ropo ARGS` in a fresh process, as tests/test_faults.py runs `ropo train`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ropo", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def refused(*args: str, cwd: Path) -> str:
    """The one error line of a `ropo` command a user got wrong (exit 2, no traceback)."""
    result = ropo(*args, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ropo: error: ") and result.stderr.count("\n") == 1
    return result.stderr


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny DPO run directory (run.json, final/)."""
    root = tmp_path_factory.mktemp("eval_run")
    data = write_synthetic_pairs(root / "train.jsonl", 16)
    result = ropo(
        "train", f"model={tiny_model_dir}", f"data={data}", f"out={root / 'run'}", *TRAIN, cwd=root
    )
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 unseen pairs plus two that tokenisation or loading must skip, one of each reason."""
    path = write_synthetic_pairs(tmp_path_factory.mktemp("eval_data") / "heldout.jsonl", 12, 7)
    with open(path, "a", encoding="utf-8") as handle:
        long_prompt = "Question: " + "apple banana " * 40 + "Answer:"  # > 48 tokens
        for record in (
            {"id": "long", "prompt": long_prompt, "chosen": " a", "rejected": " b"},
            {"id": "same", "prompt": "Question: x Answer:", "chosen": " a", "rejected": " a"},
        ):
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def evaluated(trained: Path, heldout_file: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """`ropo eval` of the run's final/ with every default, per_pair=true."""
    out = trained.parent / "eval.json"
    result = ropo(
        "eval",
        f"model={trained / 'final'}",
        f"data={heldout_file}",
        f"out={out}",
        "per_pair=true",
        "device=cpu",
        cwd=trained.parent,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result


@torch.no_grad()
def transformers_logps(model_dir: Path, prompt: list[int], response: list[int]) -> float:
    """Summed log-prob of `response` after `prompt` under AutoModelForCausalLM, by hand."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    logits = model(torch.tensor([prompt + response])).logits[0].double()  # (T, V)
    logprobs = logits.log_softmax(-1)
    # position t predicts token t + 1: the response tokens are predicted from P - 1 on
    predicted = logprobs[len(prompt) - 1 : len(prompt) + len(response) - 1]  # (R, V)
    return predicted.gather(1, torch.tensor(response)[:, None]).sum().item()


def test_eval_equals_an_independent_transformers_computation(
    evaluated: tuple[dict, subprocess.CompletedProcess],
    trained: Path,
    tiny_model_dir: Path,
    heldout_file: Path,
) -> None:
    result, _ = evaluated
    pairs, _ = load_pairs(heldout_file)
    tokens, _ = tokenize_pairs(pairs, load_tokenizer(tiny_model_dir), max_length=48)
    margins = {}
    for pair in tokens:
        logp = {
            (model, side): transformers_logps(directory, list(pair.prompt_ids), list(ids))
            for model, directory in (("policy", trained / "final"), ("ref", tiny_model_dir))
            for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids))
        }
        margins[pair.id] = (logp["policy", "chosen"] - logp["ref", "chosen"]) - (
            logp["policy", "rejected"] - logp["ref", "rejected"]
        )
    assert len(margins) == result["n_pairs"] == 12
    assert result["accuracy"] == sum(m > 0 for m in margins.values()) / 12
    assert any(abs(m) > 1e-2 for m in margins.values())  # training moved the policy
    assert result["margin_mean"] == pytest.approx(sum(margins.values()) / 12, abs=1e-3)
    assert result["reward_margin_mean"] == pytest.approx(0.5 * result["margin_mean"], rel=1e-6)
    dpo = [-math.log(1 / (1 + math.exp(-0.5 * m))) for m in margins.values()]
    assert result["loss_mean"] == pytest.approx(sum(dpo) / 12, abs=1e-3)
    per_pair = {r["id"]: r for r in read_jsonl(trained.parent / "eval.pairs.jsonl")}
    assert set(per_pair) == set(margins)
    for pair_id, margin in margins.items():
        assert per_pair[pair_id]["margin"] == pytest.approx(margin, abs=1e-3)


def test_eval_reports_skips_interval_and_the_run_defaults(
    evaluated: tuple[dict, subprocess.CompletedProcess], trained: Path, tiny_model_dir: Path
) -> None:
    result, process = evaluated
    assert result["n_read"] == 14 and result["n_skipped"] == 2
    assert result["skipped"] == {"prompt_too_long": 1, "identical_responses": 1}
    correct = round(result["accuracy"] * 12)
    assert result["accuracy_ci95"] == pytest.approx(list(wilson_interval(correct, 12)))
    assert result["accuracy_ci95"][0] < result["accuracy"] < result["accuracy_ci95"][1]
    # reference, beta and max_length came from the run's run.json, not ropo eval's defaults
    assert result["reference"] == str(tiny_model_dir)
    assert result["settings"]["beta"] == 0.5 and result["settings"]["max_length"] == 48
    rewards = result["chosen_reward_mean"] - result["rejected_reward_mean"]
    assert rewards == pytest.approx(result["reward_margin_mean"], abs=1e-6)
    assert f"preference accuracy {result['accuracy']:.4f} ({correct} of 12" in process.stdout
    assert "skipped 2 (identical_responses: 1, prompt_too_long: 1)" in process.stdout
    for record in read_jsonl(trained.parent / "eval.pairs.jsonl"):
        assert set(record) == {"id", "margin", "reward_margin", "chosen_reward", "rejected_reward"}
        assert record["reward_margin"] == pytest.approx(0.5 * record["margin"], abs=1e-6)
        difference = record["chosen_reward"] - record["rejected_reward"]
        assert difference == pytest.approx(record["reward_margin"], abs=1e-5)


def test_eval_given_keys_win_and_json_goes_to_stdout(
    evaluated: tuple[dict, subprocess.CompletedProcess], trained: Path, heldout_file: Path
) -> None:
    before, _ = evaluated
    result = ropo(
        "eval",
        f"model={trained / 'final'}",
        f"data={heldout_file}",
        "beta=2",
        "device=cpu",
        cwd=trained.parent,
    )
    assert result.returncode == 0, result.stderr
    after = json.loads(result.stdout)  # standard output holds the JSON alone
    assert "preference accuracy" in result.stderr  # the lines for a person go to stderr
    assert after["settings"]["beta"] == 2.0 and after["per_pair_file"] is None
    assert after["margin_mean"] == pytest.approx(before["margin_mean"], abs=1e-6)
    assert after["reward_margin_mean"] == pytest.approx(2 * before["margin_mean"], abs=1e-5)


def test_eval_of_a_model_itself_is_all_ties(tiny_model_dir: Path, heldout_file: Path) -> None:
    result = ropo(
        "eval",
        f"model={tiny_model_dir}",
        f"reference={tiny_model_dir}",
        f"data={heldout_file}",
        "max_length=48",
        "device=cpu",
        cwd=heldout_file.parent,
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["accuracy"] == 0.0 and scores["margin_mean"] == 0.0  # a tie counts as wrong
    assert scores["loss_mean"] == pytest.approx(math.log(2))
    assert scores["accuracy_ci95"] == pytest.approx(list(wilson_interval(0, 12)))


def test_eval_errors_are_one_line(
    trained: Path, tiny_model_dir: Path, heldout_file: Path, tmp_path: Path
) -> None:
    model, data = f"model={tiny_model_dir}", f"data={heldout_file}"
    err = refused("eval", model, data, cwd=tmp_path)
    assert "reference= is required" in err and str(tiny_model_dir) in err
    err = refused(
        "eval", f"model={trained / 'final'}", f"data={tmp_path / 'nope.jsonl'}", cwd=tmp_path
    )
    assert f"data file {tmp_path / 'nope.jsonl'} does not exist" in err
    err = refused("eval", model, data, f"reference={tiny_model_dir}", "per_pair=true", cwd=tmp_path)
    assert "config key 'per_pair' = True needs out=FILE" in err
    err = refused("eval", model, data, "beta=-1", cwd=tmp_path)
    assert "command line 'beta=-1': config key 'beta'" in err
    err = refused("eval", model, data, "refrence=x", cwd=tmp_path)
    assert "unknown key 'refrence' (did you mean 'reference'?)" in err
    err = refused("eval", data, cwd=tmp_path)
    assert "config key 'model' is required" in err


def test_eval_refuses_a_default_reference_that_is_not_there(
    trained: Path, heldout_file: Path, tmp_path: Path
) -> None:
    # The run was started from another directory, with a relative model path.
    copy = tmp_path / "run"
    (copy / "final").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        (copy / "final" / name).write_bytes((trained / "final" / name).read_bytes())
    info = json.loads((trained / "run.json").read_text())
    info["config"]["model"] = "models/elsewhere"
    (copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError, match="run.json: the run's model is the default"):
        load_eval_settings([f"model={copy / 'final'}", f"data={heldout_file}"])
    given = load_eval_settings(
        [f"model={copy / 'final'}", f"data={heldout_file}", f"reference={trained / 'final'}"]
    )
    assert given.reference == str(trained / "final") and given.beta == 0.5


def test_wilson_interval_matches_published_values() -> None:
    # Wilson (1927) score intervals at 95%, e.g. R's binom::binom.wilson(8, 10)
    assert wilson_interval(8, 10) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.7224672, 1.0), abs=1e-6)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_heldout_metrics_worked_numbers() -> None:
    ones = torch.ones(3)
    policy = PairLogps(
        torch.tensor([-1.0, -4.0, -2.0]), torch.tensor([-3.0, -2.0, -2.0]), ones, ones
    )
    reference = PairLogps(
        torch.tensor([-2.0, -3.0, -2.0]), torch.tensor([-2.0, -3.0, -2.0]), ones, ones
    )
    # margins: (-1+2) - (-3+2) = 2;  (-4+3) - (-2+3) = -2;  0 - 0 = 0 (a tie: wrong)
    metrics = heldout_metrics(policy, reference, beta=0.5)
    assert metrics.n_pairs == 3 and metrics.accuracy == 1 / 3
    assert metrics.margin_mean == 0.0 and metrics.reward_margin_mean == 0.0
    # chosen rewards 0.5 * (1, -1, 0), rejected rewards 0.5 * (-1, 1, 0)
    assert metrics.chosen_reward_mean == 0.0 and metrics.rejected_reward_mean == 0.0
    # DPO losses -log sigmoid(t) at t = 1, -1, 0: log(1 + e^-1) + log(1 + e) + log 2
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.e) + math.log(2)) / 3
    assert metrics.loss_mean == pytest.approx(expected, rel=1e-6)
    records = per_pair_records(["a", "b", "c"], policy, reference, beta=0.5)
    assert [r["margin"] for r in records] == [2.0, -2.0, 0.0]
    assert [r["chosen_reward"] for r in records] == [0.5, -0.5, 0.0]
    assert [r["rejected_reward"] for r in records] == [-0.5, 0.5, 0.0]


def test_eval_settings_check_their_values() -> None:
    with pytest.raises(ValueError, match="config key 'dtype' = 'float64' is not one of"):
        EvalSettings(model="m", data="d", dtype="float64")
    with pytest.raises(ValueError, match="config key 'max_length' = 1 must be >= 2"):
        EvalSettings(model="m", data="d", max_length=1)
