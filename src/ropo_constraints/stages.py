"""The constraint task's stages, each a function of ConstraintSettings run through ropo's
`run_stage` (skipped on a rerun that finds its inputs and outputs unchanged): prompts (1),
K samples per training prompt (2), pairs (3), a DPO/ROPO run (4; `ropo train` flips the labels)
and a policy's greedy answers to the held-out prompts, scored (5). pipeline.py calls them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import ropo_constraints
from ropo.generate import run_generate
from ropo.generate_config import GenerateSettings
from ropo_builtin.methods import recipe
from ropo_builtin.stage_cache import StageResult, fingerprint_of, run_stage
from ropo_builtin.stages import TrainJob, run_training, stage_run_keys
from ropo_constraints.evaluate import score_responses
from ropo_constraints.pairs import build_pairs, read_responses, responses_of, write_pairs
from ropo_constraints.prompts import make_prompts, read_prompts, write_prompts
from ropo_constraints.settings import ConstraintSettings

PROMPT_KEYS = ("seed", "n_train_prompts", "n_heldout_prompts")
SAMPLE_KEYS = ("model", "template", "device", "dtype", "seed", "k", "temperature")
SAMPLE_KEYS += ("max_new_tokens", "gen_batch_size")
EVAL_KEYS = ("model", "template", "device", "dtype", "max_new_tokens", "gen_batch_size")


@functools.cache
def task_fingerprint() -> str:
    """Hash of this package's .py files: a stage computed by other task code is rerun (the source
    of ropo and ropo_builtin is in every stage's key already, see ropo_builtin.stage_cache)."""
    return fingerprint_of((ropo_constraints,))


def _inputs(s: ConstraintSettings, keys: tuple[str, ...], **more: Any) -> dict[str, Any]:
    return {"task_source": task_fingerprint(), **{k: getattr(s, k) for k in keys}, **more}


def stage_prompts(s: ConstraintSettings, out: Path) -> StageResult:
    """Stage 1: seeded train and held-out prompts -> prompts_{train,heldout}.jsonl."""
    files = [out / "prompts_train.jsonl", out / "prompts_heldout.jsonl"]

    def work() -> dict[str, Any]:
        train_specs, heldout_specs = make_prompts(s.n_train_prompts, s.n_heldout_prompts, s.seed)
        write_prompts(train_specs, files[0])
        write_prompts(heldout_specs, files[1])
        return {"train": len(train_specs), "heldout": len(heldout_specs)}

    return run_stage(out, "prompts", _inputs(s, PROMPT_KEYS), files, work)


def run_ropo_generate(
    s: ConstraintSettings, model: str, prompts: Path, out: Path, **sampling: Any
) -> dict:
    """`ropo generate` (the library function) of `model` on `prompts` into `out` (JSONL);
    `sampling` sets temperature, n and seed. Returns its statistics."""
    stats = run_generate(
        GenerateSettings(
            model=model,
            prompts=str(prompts),
            out=str(out),
            template=s.template,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.gen_batch_size,
            device=s.device,
            dtype=s.dtype,
            **sampling,
        )
    )
    return {
        "responses": stats.responses,
        "new_tokens": stats.new_tokens,
        "seconds": stats.seconds,
        "finish": dict(stats.finish),
    }


def stage_samples(s: ConstraintSettings, out: Path, prompts: StageResult) -> StageResult:
    """Stage 2: K sampled responses of the instruct model per training prompt."""
    samples = out / "samples_train.jsonl"

    def work() -> dict[str, Any]:
        sampling = {"temperature": s.temperature, "n": s.k, "seed": s.seed}
        return run_ropo_generate(s, s.model, out / "prompts_train.jsonl", samples, **sampling)

    inputs = _inputs(s, SAMPLE_KEYS, prompts=prompts.key)
    return run_stage(out, "samples", inputs, [samples], work)


def stage_pairs(s: ConstraintSettings, out: Path, samples: StageResult) -> StageResult:
    """Stage 3: per training prompt, its best and worst sample by gold reward -> pairs_train.jsonl.

    ValueError when no prompt gives a pair: there would be nothing to train on.
    """
    pairs_file = out / "pairs_train.jsonl"

    def work() -> dict[str, Any]:
        specs = read_prompts(out / "prompts_train.jsonl")
        sample_file = out / "samples_train.jsonl"
        responses = responses_of(specs, read_responses(sample_file), sample_file)
        records, stats = build_pairs(specs, responses)
        if not records:
            raise ValueError(
                f"{sample_file}: the {s.k} responses of every prompt have the same gold reward, "
                "so there are no pairs; raise k or temperature"
            )
        write_pairs(records, pairs_file)
        return stats.to_dict()

    return run_stage(out, "pairs", _inputs(s, (), samples=samples.key), [pairs_file], work)


def train_keys(
    s: ConstraintSettings, out: Path, method: str, noise: float, seed: int, run_dir: Path
) -> dict[str, Any]:
    """Every `ropo train` key of one run: the pairs, the method, the noise and the seed."""
    return {
        **stage_run_keys(s.model, out / "pairs_train.jsonl", run_dir, noise, seed),
        "format": "plain",
        "template": s.template,
        "lr": s.lr,
        "beta": s.beta,
        "batch_size": s.batch_size,
        "max_length": s.max_length,
        "lora_rank": s.lora_rank,
        "dtype": s.dtype,
        "device": s.device,
        **recipe(method, s.rounds, s.epochs, s.rho, s.alpha),
    }


def stage_train(
    s: ConstraintSettings, out: Path, method: str, noise: float, seed: int, pairs: StageResult
) -> StageResult:
    """Stage 4: one `ropo train` run on the pairs, labels flipped at rate `noise` by `seed`."""
    run_dir = out / "runs" / run_name(method, noise, seed)
    keys = train_keys(s, out, method, noise, seed, run_dir)
    inputs = _inputs(s, (), pairs=pairs.key, train_keys=keys)
    job = TrainJob(f"train/{run_name(method, noise, seed)}", run_dir, keys, inputs)
    return run_stage(out, job.name, job.inputs, job.outputs, lambda: run_training(job))


def run_name(method: str, noise: float, seed: int) -> str:
    """The run's folder under <out>/runs, e.g. noise0.2-seed1/ropo."""
    return f"noise{noise:g}-seed{seed}/{method}"


def stage_eval(
    s: ConstraintSettings, out: Path, name: str, model: str, upstream: list[str]
) -> StageResult:
    """Stage 5: greedy answers of `model` to the held-out prompts -> eval/<name>.jsonl, scored
    by the gold reward (score_responses: mean, bootstrap interval, per-prompt rewards)."""
    answers = out / "eval" / f"{name}.jsonl"

    def work() -> dict[str, Any]:
        heldout = out / "prompts_heldout.jsonl"
        generation = run_ropo_generate(s, model, heldout, answers, temperature=0.0, n=1)
        specs = read_prompts(heldout)
        responses = responses_of(specs, read_responses(answers), answers)
        return {**score_responses(specs, [r[0] for r in responses]), "generation": generation}

    inputs = _inputs(s, EVAL_KEYS, model_dir=model, upstream=upstream)
    return run_stage(out, f"eval/{name}", inputs, [answers], work)
