"""The built-in task's stages, each a function of TaskSettings run through `run_stage`: task and
tokenizer (1), SFT (2), pairs (3), a DPO/ROPO run (5; `ropo.train` flips the labels, stage 4) and
held-out evaluation (6). pipeline.py calls them in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ropo.config_load import build_config
from ropo.data import write_pairs_jsonl
from ropo.jsonl import read_jsonl
from ropo.models import load_model, load_tokenizer
from ropo.models.tokenizer import train_tokenizer
from ropo.resources import pick_device
from ropo.train import train
from ropo_builtin import evaluate
from ropo_builtin.methods import method_keys
from ropo_builtin.pairs import build_pairs, sample_responses
from ropo_builtin.settings import TaskSettings
from ropo_builtin.sft import tiny_llama_config, train_sft, write_demonstrations, write_initial_model
from ropo_builtin.sorting import TaskData, make_task
from ropo_builtin.stage_cache import StageResult, run_stage

# The settings each stage reads; a stage reruns when one of them (or an upstream stage) changes.
DEMO_KEYS = "seed n_sft min_len max_len demo_error_rate vocab_size".split()
SFT_KEYS = "dim n_layers n_heads sft_steps sft_batch_size sft_lr device".split()
PAIR_KEYS = "seed samples_per_prompt temperature max_new_tokens device".split()
EVAL_KEYS = "eval_samples temperature max_new_tokens device".split()


def _pick(s: TaskSettings, *keys: list[str]) -> dict[str, Any]:
    return {name: getattr(s, name) for group in keys for name in group}


def stage_task(s: TaskSettings, out: Path) -> StageResult:
    """Stage 1: seeded prompts and demonstrations, and a tokenizer trained on the demonstrations."""
    task_dir = out / "task"

    def work() -> dict[str, Any]:
        task = make_task(
            s.n_sft,
            s.n_train_prompts,
            s.n_heldout_prompts,
            s.seed,
            s.min_len,
            s.max_len,
            demo_error_rate=s.demo_error_rate,
        )
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / "task.json").write_text(json.dumps(asdict(task)))
        texts = task.sft_prompts + task.demonstrations
        tokenizer = train_tokenizer(texts, task_dir, s.vocab_size, seed=s.seed)
        return {"demo_errors": task.demo_errors, "vocab_size": tokenizer.vocab_size}

    inputs = _pick(s, DEMO_KEYS, ["n_train_prompts", "n_heldout_prompts"])
    outputs = [task_dir / "task.json", task_dir / "tokenizer.model"]
    return run_stage(out, "task", inputs, outputs, work)


def load_task(out: Path) -> TaskData:
    return TaskData(**json.loads((out / "task" / "task.json").read_text()))


def sft_positions(s: TaskSettings) -> int:
    """Positions of the SFT model: the longest prompt plus response of the task, in tokens."""
    return 4 * s.max_len + s.max_new_tokens + 8  # "▁" + digit per number, both sides


def sft_model(out: Path) -> Path:
    """The SFT model directory: final/ of the `ropo sft` run of stage 2."""
    return out / "sft" / "final"


def stage_sft(s: TaskSettings, out: Path) -> StageResult:
    """Stage 2: a tiny Llama trained from a seeded random start on the demonstrations by
    `ropo sft`; its run directory is <out>/sft, the model <out>/sft/final (HF layout).

    Its inputs are the demonstration and model settings alone (not the task stage's key): the
    demonstrations and the tokenizer do not change with the number of preference prompts.
    """

    def work() -> dict[str, Any]:
        task, tokenizer = load_task(out), load_tokenizer(out / "task")
        positions = sft_positions(s)
        config = tiny_llama_config(tokenizer, s.dim, s.n_layers, s.n_heads, positions)
        write_initial_model(config, tokenizer, s.seed, out / "sft_init")
        write_demonstrations(task.sft_prompts, task.demonstrations, out / "sft_data.jsonl")
        losses = train_sft(s, out / "sft_init", out / "sft_data.jsonl", out / "sft", positions)
        tail = losses[-50:]
        return {"parameters": config.num_params(), "final_nll": sum(tail) / len(tail)}

    outputs = [sft_model(out) / "config.json"]
    return run_stage(out, "sft", _pick(s, DEMO_KEYS, SFT_KEYS), outputs, work)


def stage_pairs(s: TaskSettings, out: Path, task: StageResult, sft: StageResult) -> StageResult:
    """Stage 3: K SFT samples per prompt, ranked by the gold reward, as train and held-out pairs."""
    files = {"train": out / "pairs_train.jsonl", "heldout": out / "pairs_heldout.jsonl"}

    def work() -> dict[str, Any]:
        prompts = load_task(out)
        tokenizer, model = load_tokenizer(sft_model(out)), load_model(sft_model(out))
        model = model.to(pick_device(s.device))
        stats = {}
        splits = {"train": prompts.train_prompts, "heldout": prompts.heldout_prompts}
        for offset, (split, split_prompts) in enumerate(splits.items()):
            responses = sample_responses(
                model,
                tokenizer,
                split_prompts,
                s.samples_per_prompt,
                s.temperature,
                s.max_new_tokens,
                s.seed + offset,
                desc=f"sampling {split} responses",
            )
            pairs, split_stats = build_pairs(split_prompts, responses, split, s.seed + offset)
            write_pairs_jsonl(pairs, files[split])
            stats[split] = asdict(split_stats)
        return stats

    inputs = {"task": task.key, "sft": sft.key, **_pick(s, PAIR_KEYS)}
    return run_stage(out, "pairs", inputs, list(files.values()), work)


def run_dir_for(out: Path, method: str, noise: float, seed: int) -> Path:
    """Where a preference run lives: <out>/runs/noise<η>-seed<seed>/<method>. Clean DPO is DPO
    at noise 0, so the demo's dpo_clean and the sweep's DPO at η = 0 are one cached run."""
    name = "dpo" if method == "dpo_clean" else method
    return out / "runs" / f"noise{noise:g}-seed{seed}" / name


@dataclass(frozen=True)
class TrainJob:
    """Stage 5 for one run: its stage name, the inputs its cache key hashes, the `ropo train`
    keys. Plain data, so that a worker process (runs.py) can take it."""

    name: str  # train/<run dir relative to out>
    run_dir: Path
    keys: dict[str, Any]  # `ropo train` key -> value
    inputs: dict[str, Any]

    @property
    def outputs(self) -> list[Path]:
        return [self.run_dir / "final" / "config.json"]


def train_job(
    s: TaskSettings, out: Path, method: str, noise: float, seed: int, pairs: StageResult
) -> TrainJob:
    """Stage 5: a DPO/ROPO run from the SFT model on the train pairs (`train` flips labels)."""
    run_dir = run_dir_for(out, method, noise, seed)
    keys = {
        **stage_run_keys(sft_model(out), out / "pairs_train.jsonl", run_dir, noise, seed),
        **s.run_keys(),
        "max_length": sft_positions(s),  # no longer than the SFT model's positions
        **method_keys(method, s, noise),
    }
    inputs = {"pairs": pairs.key, "keys": keys}
    return TrainJob(f"train/{run_dir.relative_to(out)}", run_dir, keys, inputs)


def stage_run_keys(
    model: str | Path, data: Path, run_dir: Path, noise: float, seed: int
) -> dict[str, Any]:
    """The `ropo train` keys of a run that is a stage: its files, flip rate and seed, a metrics
    line every 5 steps, and overwrite (the stage reruns only when its inputs changed, and then
    starts over)."""
    return {
        "model": str(model),
        "data": str(data),
        "out": str(run_dir),
        "overwrite": True,
        "noise": noise,
        "seed": seed,
        "log_every": 5,
    }


def run_training(job: TrainJob) -> dict[str, Any]:
    """The work of stage 5: `ropo train` with the job's keys; its last metrics.jsonl line."""
    train(build_config(job.keys))
    lines = (job.run_dir / "metrics.jsonl").read_text().splitlines()
    return {"last_round": json.loads(lines[-1])}


def stage_train(
    s: TaskSettings, out: Path, method: str, noise: float, seed: int, pairs: StageResult
) -> StageResult:
    """Stage 5 in this process (jobs=1): train, or skip when its inputs are unchanged."""
    job = train_job(s, out, method, noise, seed, pairs)
    return run_stage(out, job.name, job.inputs, job.outputs, lambda: run_training(job))


def stage_eval(
    s: TaskSettings,
    out: Path,
    name: str,
    model_dir: Path,
    upstream: list[str],
    judge: Callable[[], evaluate.Judge],
) -> StageResult:
    """Stage 6: a policy on the held-out prompts, with the mean gold reward of each prompt (in
    prompt order, for the paired statistics of stats.py); for a training run also its audit
    summary per round, with the flip-rate estimates of a rho=auto run."""

    def work() -> dict[str, Any]:
        if model_dir == sft_model(out):
            sft = judge()
            return {"scores": sft.sft_scores.to_dict(), "prompt_rewards": sft.sft_prompt_rewards}
        scores, prompt_rewards = judge().score(model_dir, name)
        audit = read_jsonl(model_dir.parent / "pairs.jsonl")
        rounds = evaluate.noise_identification(audit)
        metrics = read_jsonl(model_dir.parent / "metrics.jsonl")
        return {
            "scores": scores.to_dict(),
            "prompt_rewards": prompt_rewards,
            "rounds": evaluate.with_noise_estimates(rounds, metrics),
        }

    inputs = {"upstream": upstream, **_pick(s, EVAL_KEYS)}
    return run_stage(out, f"eval/{name}", inputs, [], work)
