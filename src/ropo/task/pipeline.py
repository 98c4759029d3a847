"""The built-in demonstration, end to end: task -> tokenizer -> SFT -> pairs -> DPO / ROPO runs
(through `ropo.train`, which injects the label noise) -> held-out evaluation -> report.

Every stage records a hash of its inputs in <out>/stages/<name>.json and is skipped when a rerun
finds the same hash and its outputs in place; a changed setting reruns the stages that read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ropo.config import check_range, load_config
from ropo.data import load_pairs, write_pairs_jsonl
from ropo.models import Transformer, load_model, load_tokenizer
from ropo.models.tokenizer import train_tokenizer
from ropo.resources import pick_device
from ropo.task import evaluate, report
from ropo.task.pairs import build_pairs, sample_responses
from ropo.task.sft import save_sft, tiny_llama_config, train_sft
from ropo.task.sorting import TaskData, make_task
from ropo.train import train


@dataclass(frozen=True)
class TaskSettings:
    """Everything the built-in run depends on; the defaults are `make train`'s run."""

    seed: int = 0  # task, SFT, sampling, and the training runs' noise and batch order
    # the task (sorting.py)
    n_sft: int = 40000  # demonstrations for SFT
    n_train_prompts: int = 12000  # prompts offered for preference pairs (ties give none)
    n_heldout_prompts: int = 1000  # prompts for evaluation and the clean held-out pairs
    min_len: int = 3
    max_len: int = 6
    demo_error_rate: float = 0.3  # share of deliberately wrong demonstrations
    vocab_size: int = 288  # sentencepiece needs ~270 pieces for its byte fallback alone
    # the SFT model (sft.py)
    dim: int = 96
    n_layers: int = 3
    n_heads: int = 4
    sft_steps: int = 2000
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    # pair building (pairs.py)
    samples_per_prompt: int = 4
    temperature: float = 1.0  # for pair sampling, rejection sampling and evaluation
    max_new_tokens: int = 24
    # the preference runs (ropo.train)
    methods: tuple[str, ...] = ("dpo_clean", "dpo", "ropo", "ropo_rs")
    noise: float = 0.4
    beta: float = 1.0  # larger than the usual 0.1: it keeps the tiny policy near SFT
    lr: float = 1e-4  # the same for every method; ROPO at 3e-4 drifted and sampled worse
    batch_size: int = 32
    rounds: int = 3  # ROPO rounds; DPO trains rounds * epochs_per_round epochs in one round
    epochs_per_round: int = 1
    rho: float = 0.2  # share of pairs ROPO drops after each round (the highest-loss ones)
    alpha: float = 14.0  # ROPO's trade-off α (the paper's default)
    rs_k: int = 4  # rejection sampling: candidates per prompt of a dropped pair
    # evaluation (evaluate.py)
    eval_samples: int = 4  # samples per held-out prompt
    device: str = "cpu"  # the model is tiny: a GPU buys little; "auto" picks one if present
    threads: int = 0  # torch CPU threads (0 = torch's default)

    def __post_init__(self) -> None:
        # Checked here, before any stage runs: a bad value would otherwise surface only after
        # minutes of SFT, when `ropo train` or a stage first reads it.
        for name in COUNTS:
            check_range(name, getattr(self, name), 1, None)
        for name in ("sft_lr", "lr", "beta"):
            check_range(name, getattr(self, name), 0.0, None, low_open=True)
        check_range("max_len", self.max_len, self.min_len, None)  # min_len <= max_len
        check_range("demo_error_rate", self.demo_error_rate, 0.0, 1.0)
        # 256 byte pieces + unk, bos, eos + at least one character; sentencepiece knows the rest
        check_range("vocab_size", self.vocab_size, 260, None)
        if self.dim % self.n_heads != 0 or (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(
                f"config key 'dim' = {self.dim} must be n_heads={self.n_heads} times an even "
                "head size (RoPE rotates pairs of dimensions)"
            )
        check_range("samples_per_prompt", self.samples_per_prompt, 2, None)  # a pair needs two
        check_range("temperature", self.temperature, 0.0, None)  # 0 is greedy
        unknown = [m for m in self.methods if m not in METHOD_LABELS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(
                f"config key 'methods' = {','.join(self.methods)!r} must be distinct names "
                f"from {','.join(METHOD_LABELS)}, separated by commas"
            )
        check_range("noise", self.noise, 0.0, 0.5, high_open=True)
        check_range("rho", self.rho, 0.0, 1.0, high_open=True)
        check_range("alpha", self.alpha, 2.0, None, low_open=True)  # loss/preference.py says why
        check_range("rs_k", self.rs_k, 2, None)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(
                f"config key 'device' = {self.device!r} is not auto, cpu, cuda or cuda:N"
            )
        check_range("threads", self.threads, 0, None)


# Settings that count something and must be at least 1.
COUNTS = (
    "n_sft n_train_prompts n_heldout_prompts min_len dim n_layers n_heads sft_steps "
    "sft_batch_size max_new_tokens batch_size rounds epochs_per_round eval_samples"
).split()
# The settings each stage reads; a stage reruns when one of them (or an upstream stage) changes.
DEMO_KEYS = "seed n_sft min_len max_len demo_error_rate vocab_size".split()
SFT_KEYS = "dim n_layers n_heads sft_steps sft_batch_size sft_lr device".split()
PAIR_KEYS = "seed samples_per_prompt temperature max_new_tokens device".split()
EVAL_KEYS = "eval_samples temperature max_new_tokens device".split()

METHOD_LABELS = {
    "dpo_clean": "DPO, clean labels",
    "dpo": "DPO",
    "ropo_loss": "ROPO loss, no filtering",
    "ropo": "ROPO (no RS)",
    "ropo_rs": "ROPO + RS",
}


def method_overrides(method: str, s: TaskSettings) -> list[str]:
    """The `ropo train` keys that make `method`; DPO gets as many epochs as ROPO gets in total."""
    dpo = ["loss=dpo", "rounds=1", "rho=0", f"epochs={s.rounds * s.epochs_per_round}"]
    ropo = ["loss=ropo", f"alpha={s.alpha}", f"rounds={s.rounds}", f"rho={s.rho}"]
    ropo.append(f"epochs={s.epochs_per_round}")
    table = {
        "dpo_clean": dpo,
        "dpo": dpo,
        "ropo_loss": ["loss=ropo", f"alpha={s.alpha}", *dpo[1:]],
        "ropo": ropo,
        "ropo_rs": [*ropo, "rejection_sampling=true", f"rs_k={s.rs_k}"],
    }
    return table[method]


@dataclass(frozen=True)
class StageResult:
    key: str  # hash of the stage's inputs, upstream keys included
    result: dict[str, Any]
    seconds: float
    cached: bool


def run_stage(
    out: Path, name: str, inputs: dict[str, Any], outputs: list[Path], work: Callable[[], dict]
) -> StageResult:
    """Run `work` unless <out>/stages/<name>.json holds the same inputs and `outputs` all exist."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    marker = out / "stages" / f"{name}.json"
    if marker.is_file() and all(p.exists() for p in outputs):
        done = json.loads(marker.read_text())
        if done["key"] == key:
            print(f"[{name}] up to date, skipped ({done['seconds']:.0f} s when it ran)")
            return StageResult(key, done["result"], done["seconds"], cached=True)
    print(f"[{name}] running")
    marker.unlink(missing_ok=True)  # an interrupted stage must not look done
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "inputs": inputs, "seconds": seconds, "result": result}
    marker.write_text(json.dumps(record, indent=1, default=str))
    return StageResult(key, result, seconds, cached=False)


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


def stage_sft(s: TaskSettings, out: Path) -> StageResult:
    """Stage 2: a tiny Llama trained on the demonstrations, saved as an HF model directory.

    Its inputs are the demonstration and model settings alone (not the task stage's key): the
    demonstrations and the tokenizer do not change with the number of preference prompts.
    """

    def work() -> dict[str, Any]:
        task, tokenizer = load_task(out), load_tokenizer(out / "task")
        torch.manual_seed(s.seed)
        positions = 4 * s.max_len + s.max_new_tokens + 8  # "▁" + digit per number, both sides
        config = tiny_llama_config(tokenizer, s.dim, s.n_layers, s.n_heads, positions)
        model = Transformer(config).to(pick_device(s.device))
        losses = train_sft(
            model,
            tokenizer,
            task.sft_prompts,
            task.demonstrations,
            s.sft_steps,
            s.sft_batch_size,
            s.sft_lr,
            s.seed,
        )
        save_sft(model, tokenizer, out / "sft")
        (out / "sft_log.json").write_text(json.dumps({"nll": losses}))
        tail = losses[-50:]
        return {"parameters": config.num_params(), "final_nll": sum(tail) / len(tail)}

    return run_stage(out, "sft", _pick(s, DEMO_KEYS, SFT_KEYS), [out / "sft/config.json"], work)


def stage_pairs(s: TaskSettings, out: Path, task: StageResult, sft: StageResult) -> StageResult:
    """Stage 3: K SFT samples per prompt, ranked by the gold reward, as train and held-out pairs."""
    files = {"train": out / "pairs_train.jsonl", "heldout": out / "pairs_heldout.jsonl"}

    def work() -> dict[str, Any]:
        prompts = load_task(out)
        tokenizer, model = load_tokenizer(out / "sft"), load_model(out / "sft")
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


def stage_train(
    s: TaskSettings,
    out: Path,
    method: str,
    noise: float,
    seed: int,
    run_dir: Path,
    pairs: StageResult,
) -> StageResult:
    """Stage 5: a DPO/ROPO run from the SFT model on the train pairs (`train` flips labels)."""
    overrides = [
        f"model={out / 'sft'}",
        f"data={out / 'pairs_train.jsonl'}",
        f"out={run_dir}",
        f"noise={noise}",
        f"seed={seed}",
        f"lr={s.lr}",
        f"beta={s.beta}",
        f"batch_size={s.batch_size}",
        "max_length=64",
        "log_every=5",
        f"rs_temperature={s.temperature}",
        f"rs_max_new_tokens={s.max_new_tokens}",
        f"device={s.device}",
        *method_overrides(method, s),
    ]

    def work() -> dict[str, Any]:
        train(load_config(None, overrides))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {"last_round": json.loads(lines[-1])}

    name = f"train/{run_dir.relative_to(out)}"
    inputs = {"pairs": pairs.key, "overrides": overrides}
    return run_stage(out, name, inputs, [run_dir / "final" / "config.json"], work)


def stage_eval(
    s: TaskSettings,
    out: Path,
    name: str,
    model_dir: Path,
    upstream: list[str],
    judge: Callable[[], evaluate.Judge],
) -> StageResult:
    """Stage 6: a policy on the held-out prompts; for a training run also its audit summary."""

    def work() -> dict[str, Any]:
        if model_dir == out / "sft":
            return {"scores": judge().sft_scores.to_dict()}
        scores = judge().score(model_dir, name)
        audit_file = model_dir.parent / "pairs.jsonl"
        audit = [json.loads(line) for line in audit_file.read_text().splitlines()]
        return {"scores": scores.to_dict(), "rounds": evaluate.noise_identification(audit)}

    inputs = {"upstream": upstream, **_pick(s, EVAL_KEYS)}
    return run_stage(out, f"eval/{name}", inputs, [], work)


@dataclass
class Prepared:
    """Stages 1-3 and the SFT model's evaluation, shared by every run of a demo or a sweep."""

    pairs: StageResult
    sft_eval: StageResult
    judge: Callable[[], evaluate.Judge]


def prepare(s: TaskSettings, out: Path) -> Prepared:
    if s.threads:
        torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    pairs = stage_pairs(s, out, stage_task(s, out), stage_sft(s, out))
    cache: list[evaluate.Judge] = []

    def judge() -> evaluate.Judge:  # built on first use: a fully cached rerun never loads models
        if not cache:
            heldout, _ = load_pairs(out / "pairs_heldout.jsonl")
            prompts = load_task(out).heldout_prompts
            cache.append(
                evaluate.Judge(
                    out / "sft",
                    prompts,
                    heldout,
                    s.eval_samples,
                    s.temperature,
                    s.max_new_tokens,
                    s.seed + 100,
                    pick_device(s.device),
                )
            )
        return cache[0]

    return Prepared(pairs, stage_eval(s, out, "sft", out / "sft", [pairs.key], judge), judge)


def run_method(
    s: TaskSettings,
    out: Path,
    prepared: Prepared,
    method: str,
    noise: float,
    seed: int,
    run_dir: Path,
) -> dict[str, Any]:
    """Train one method (stage 5) and evaluate it (stage 6): one row of the results."""
    trained = stage_train(s, out, method, noise, seed, run_dir, prepared.pairs)
    name = str(run_dir.relative_to(out))
    upstream = [trained.key, prepared.sft_eval.key]
    scored = stage_eval(s, out, name, run_dir / "final", upstream, prepared.judge)
    return {
        "method": method,
        "label": METHOD_LABELS[method],
        "noise": noise,
        "seed": seed,
        "run_dir": name,
        "train_seconds": trained.seconds,
        **scored.result,
    }


def run_builtin(settings: TaskSettings, out: Path) -> dict[str, Any]:
    """The default demonstration: every method of `settings.methods` at noise `settings.noise`
    (dpo_clean at 0), evaluated on held-out prompts; writes results.json and report.md."""
    start, out = time.perf_counter(), Path(out)
    prepared = prepare(settings, out)
    runs = []
    for method in settings.methods:
        noise = 0.0 if method == "dpo_clean" else settings.noise
        runs.append(run_method(settings, out, prepared, method, noise, settings.seed, out / method))
    results = {
        "settings": asdict(settings),
        "pairs": prepared.pairs.result,
        "sft": prepared.sft_eval.result["scores"],
        "runs": runs,
        "stage_seconds": stage_seconds(out),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write_report(out)
    print(report.results_table(results))
    print(f"report: {out / 'report.md'}  ({results['wall_seconds']:.0f} s this time)")
    return results


def run_sweep(
    settings: TaskSettings,
    out: Path,
    noises: tuple[float, ...] = (0.0, 0.2, 0.4),
    seeds: tuple[int, ...] = (0, 1),
    methods: tuple[str, ...] = ("dpo", "ropo"),
) -> dict[str, Any]:
    """Each method at each noise rate and training seed, reusing stages 1-3 of `out`; writes
    sweep_results.json and adds the noise plots to report.md."""
    start, out = time.perf_counter(), Path(out)
    prepared = prepare(settings, out)
    rows = []
    for noise in noises:
        for seed in seeds:
            for method in methods:
                run_dir = out / "sweep" / f"noise{noise:g}-seed{seed}" / method
                rows.append(run_method(settings, out, prepared, method, noise, seed, run_dir))
    sweep = {
        "settings": asdict(settings),
        "sft": prepared.sft_eval.result["scores"],
        "runs": rows,
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "sweep_results.json").write_text(json.dumps(sweep, indent=1))
    report.write_report(out)
    print(report.sweep_table(sweep))
    print(f"report: {out / 'report.md'}  ({sweep['wall_seconds']:.0f} s this time)")
    return sweep


def stage_seconds(out: Path) -> dict[str, float]:
    """How long each stage took when it last ran (a cached stage keeps its time)."""
    markers = sorted((out / "stages").rglob("*.json"))
    root = out / "stages"
    return {
        str(m.relative_to(root).with_suffix("")): json.loads(m.read_text())["seconds"]
        for m in markers
    }


def parse_settings(words: list[str]) -> tuple[TaskSettings, Path, bool]:
    """TaskSettings from `key=value` words, plus out=<dir> (default runs/builtin) and sweep=true."""
    fields = {f.name: f.default for f in dataclasses.fields(TaskSettings)}
    values: dict[str, Any] = {}
    out, sweep = Path("runs/builtin"), False
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {word!r}")
        if key == "out":
            if not raw:
                raise ValueError("setting out='': expected a directory")
            out = Path(raw)
        elif key == "sweep":
            sweep = _parse_setting(key, raw, False)
        elif key == "methods":
            values[key] = tuple(m.strip() for m in raw.split(",") if m.strip())
        elif key in fields:
            values[key] = _parse_setting(key, raw, fields[key])
        else:
            raise ValueError(f"unknown setting {key!r}; settings: out, sweep, {', '.join(fields)}")
    return TaskSettings(**values), out, sweep


def _parse_setting(key: str, raw: str, default: Any) -> Any:
    """The YAML value of `raw` if it has the type of `default`; else a ValueError naming both."""
    expected = type(default)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML: only a str setting can take it as it is
    if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-5" (no dot) and "nan" as strings; TaskSettings rejects nan
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"setting {key}={raw!r}: expected {expected.__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    """`python -m ropo.task.pipeline [out=DIR] [sweep=true] [setting=value ...]`."""
    try:
        settings, out, sweep = parse_settings(sys.argv[1:] if argv is None else argv)
        pick_device(settings.device)  # device=cuda without CUDA fails now, not after stage 1
        (run_sweep if sweep else run_builtin)(settings, out)
    except (ValueError, FileNotFoundError) as err:
        print(f"ropo builtin: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
