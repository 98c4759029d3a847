"""Settings of the built-in task: what `ropo builtin key=value ...` may change, checked here
before any stage runs. The pipeline (pipeline.py) hands one TaskSettings to every stage.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ropo.config import check_range


@dataclass(frozen=True)
class TaskSettings:
    """Everything the built-in run depends on; the defaults are `make train`'s run."""

    seed: int = 0  # task, SFT, sampling, and the training runs' noise and batch order
    # the task (sorting.py)
    n_sft: int = 40000  # demonstrations for SFT
    n_train_prompts: int = 8000  # prompts offered for preference pairs (ties give none)
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
    methods: tuple[str, ...] = ("dpo_clean", "dpo", "ropo", "ropo_auto")
    noise: float = 0.4
    beta: float = 1.0  # larger than the usual 0.1: it keeps the tiny policy near SFT
    lr: float = 1e-4  # the same for every method; ROPO at 3e-4 drifted and sampled worse
    batch_size: int = 32
    rounds: int = 3  # ROPO rounds; DPO trains rounds * epochs_per_round epochs in one round
    epochs_per_round: int = 1
    rho: float = 0.2  # share of pairs ROPO drops after each round (lowest margin = highest loss)
    alpha: float = 14.0  # ROPO's trade-off α: the default the paper's reviews report
    rs_k: int = 4  # rejection sampling: candidates per prompt of a dropped pair
    # evaluation (evaluate.py)
    eval_samples: int = 4  # samples per held-out prompt
    device: str = "cpu"  # the model is tiny: a GPU buys little; "auto" picks one if present
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # the preference runs train in this many worker processes at once (runs.py); 1 = in-process
    jobs: int = 2
    # `sweep=true`: every method of sweep_methods at every noise rate and training seed
    sweep_seeds: tuple[int, ...] = (0, 1, 2)  # the runs' seed: which labels flip, batch order
    sweep_noises: tuple[float, ...] = (0.0, 0.2, 0.4)
    sweep_methods: tuple[str, ...] = (
        "dpo",
        "cdpo",
        "cdpo_half",
        "rdpo",
        "rdpo_half",
        "ipo",
        "ropo",
        "ropo_rs",
        "ropo_auto",
    )
    # the methods of sweep_methods that also run at η = 0 (clean data is about what ROPO costs
    # against DPO there); the others are skipped at η = 0, to keep `make sweep` near an hour
    sweep_clean_methods: tuple[str, ...] = ("dpo", "ropo", "ropo_auto")

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
        check_methods("methods", self.methods)
        check_range("noise", self.noise, 0.0, 0.5, high_open=True)
        told_nothing = [m for m in self.methods if equals_dpo(m, self.noise)]
        if told_nothing:
            raise ValueError(
                f"config key 'methods' has {','.join(told_nothing)} at noise=0, where ε = 0 "
                "makes them plain DPO: drop them from methods or set noise > 0"
            )
        check_range("rho", self.rho, 0.0, 1.0, high_open=True)
        check_range("alpha", self.alpha, 2.0, None, low_open=True)  # loss/preference.py says why
        check_range("rs_k", self.rs_k, 2, None)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(
                f"config key 'device' = {self.device!r} is not auto, cpu, cuda or cuda:N"
            )
        check_range("threads", self.threads, 0, None)
        check_range("jobs", self.jobs, 1, None)
        self.check_sweep()

    def check_sweep(self) -> None:
        """The sweep keys: distinct seeds >= 0 and noise rates in [0, 0.5), DPO among the methods
        (every comparison is against it), and no dpo_clean (DPO at noise 0 is clean DPO)."""
        for name in ("sweep_seeds", "sweep_noises"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"config key {name!r} = {values!r} must be distinct values")
        for seed in self.sweep_seeds:
            check_range("sweep_seeds", seed, 0, None)
        for noise in self.sweep_noises:
            check_range("sweep_noises", noise, 0.0, 0.5, high_open=True)
        check_methods("sweep_methods", self.sweep_methods)
        check_methods("sweep_clean_methods", self.sweep_clean_methods)
        if "dpo" not in self.sweep_methods or "dpo_clean" in self.sweep_methods:
            raise ValueError(
                f"config key 'sweep_methods' = {','.join(self.sweep_methods)!r} must include dpo "
                "(every method is compared with it) and not dpo_clean (dpo at noise 0 is clean DPO)"
            )


# Settings that count something and must be at least 1.
COUNTS = (
    "n_sft n_train_prompts n_heldout_prompts min_len dim n_layers n_heads sft_steps "
    "sft_batch_size max_new_tokens batch_size rounds epochs_per_round eval_samples"
).split()

METHOD_LABELS = {
    "dpo_clean": "DPO, clean labels",
    "dpo": "DPO",
    "cdpo": "cDPO (ε = η)",
    "cdpo_half": "cDPO (ε = η/2)",
    "rdpo": "rDPO (ε = η)",
    "rdpo_half": "rDPO (ε = η/2)",
    "ipo": "IPO",
    "ropo_loss": "ROPO loss, no filtering",
    "ropo": "ROPO (no RS)",
    "ropo_rs": "ROPO + RS",
    "ropo_auto": "ROPO (rho=auto)",
    "ropo_auto_margin": "ROPO (rho=auto, margin ranking)",
}

# Methods told the true flip rate η (oracle baselines) or half of it, as their ε.
NOISE_SHARE = {"cdpo": 1.0, "cdpo_half": 0.5, "rdpo": 1.0, "rdpo_half": 0.5}


def equals_dpo(method: str, noise: float) -> bool:
    """True for a method that is plain DPO at this noise rate: cDPO and rDPO with ε = 0."""
    return method in NOISE_SHARE and noise == 0


def check_methods(key: str, methods: tuple[str, ...]) -> None:
    """ValueError naming `key` unless `methods` are distinct names of METHOD_LABELS."""
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(
            f"config key {key!r} = {','.join(methods)!r} must be distinct names "
            f"from {','.join(METHOD_LABELS)}, separated by commas"
        )


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
        elif isinstance(fields.get(key), tuple):  # methods, sweep_seeds, ...: a comma list
            kind = type(fields[key][0])
            items = [item.strip() for item in raw.split(",") if item.strip()]
            try:
                values[key] = tuple(_parse_setting(key, item, kind()) for item in items)
            except ValueError:
                raise ValueError(
                    f"setting {key}={raw!r}: expected {kind.__name__}s, separated by commas"
                ) from None
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
