"""Settings of the built-in task: what `ropo builtin key=value ...` may change.

One frozen dataclass, read by ropo's `load_settings` (the parsing and type checks of `ropo
train`'s keys; a tuple key takes comma-separated values) and checked before any stage runs: the
task's own keys here, the keys a preference run takes under `ropo train`'s names (noise, lr,
beta, rho, alpha, ...) by ropo's own config. The pipeline hands it to every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ropo.config import DataSettings, FilterSettings, LossSettings, OptimSettings
from ropo.config_fields import check_distinct, check_range, setting, setting_like
from ropo.config_load import build_config

COMMAND = "ropo builtin"

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
SWEEP_METHODS = (
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


@dataclass(frozen=True)
class TaskSettings:
    """Everything `ropo builtin` reads; the defaults are `make train`'s run."""

    out: str = setting("runs/builtin", "directory of every stage's files and of the report")
    sweep: bool = setting(False, "run the noise sweep (the sweep_* keys) instead of the demo")
    seed: int = setting(0, "seeds the task, SFT, sampling, the runs' label flips and order")
    # the task (sorting.py)
    n_sft: int = setting(40000, "demonstrations for SFT")
    n_train_prompts: int = setting(8000, "prompts offered for preference pairs (ties give none)")
    n_heldout_prompts: int = setting(1000, "prompts for evaluation and the clean held-out pairs")
    min_len: int = setting(3, "fewest numbers to sort")
    max_len: int = setting(6, "most numbers to sort")
    demo_error_rate: float = setting(0.3, "share of deliberately wrong demonstrations")
    vocab_size: int = setting(288, "sentencepiece needs ~270 pieces for its byte fallback alone")
    # the SFT model (sft.py)
    dim: int = setting(96, "width of the SFT model")
    n_layers: int = setting(3, "blocks of the SFT model")
    n_heads: int = setting(4, "attention heads of the SFT model")
    sft_steps: int = setting(2000, "SFT optimizer steps")
    sft_batch_size: int = setting(32, "demonstrations per SFT step")
    sft_lr: float = setting(3e-3, "peak SFT learning rate")
    # pair building (pairs.py)
    samples_per_prompt: int = setting(4, "SFT samples per prompt, ranked into a pair")
    temperature: float = setting(1.0, "of pair sampling, rejection sampling and evaluation")
    max_new_tokens: int = setting(24, "length limit of every sampled response")
    # the preference runs: `ropo train`'s keys, declared and checked as there, with this task's
    # defaults
    methods: tuple[str, ...] = setting(
        ("dpo_clean", "dpo", "ropo", "ropo_auto"), "the demo's methods (a wrong name lists all)"
    )
    noise: float = setting_like(DataSettings, "noise", 0.4)
    beta: float = setting_like(LossSettings, "beta", 1.0, "above the usual 0.1, to stay near SFT")
    lr: float = setting_like(OptimSettings, "lr", 1e-4, "ROPO at 3e-4 drifted and sampled worse")
    batch_size: int = setting_like(OptimSettings, "batch_size", 32)
    rounds: int = setting_like(FilterSettings, "rounds", 3, "DPO trains rounds * epochs_per_round")
    epochs_per_round: int = setting(1, "epochs of each ROPO round")
    rho: float = setting(0.2, "share of pairs ROPO drops after each round (the lowest margins)")
    alpha: float = setting_like(LossSettings, "alpha")
    rs_k: int = setting_like(FilterSettings, "rs_k")
    # evaluation (evaluate.py)
    eval_samples: int = setting(4, "samples per held-out prompt")
    device: str = setting("cpu", "cpu | auto | cuda | cuda:N; the model is tiny: a GPU buys little")
    threads: int = setting(0, "torch CPU threads (0 = torch's default)")
    jobs: int = setting(2, "preference runs trained at once in worker processes; 1 = in-process")
    # sweep=true: every method of sweep_methods at every noise rate and seed
    sweep_seeds: tuple[int, ...] = setting((0, 1, 2), "the runs' seeds: flipped labels, order")
    sweep_noises: tuple[float, ...] = setting((0.0, 0.2, 0.4), "the flip rates of the sweep")
    sweep_methods: tuple[str, ...] = setting(SWEEP_METHODS, "must include dpo: all compare with it")
    # Clean data is about what ROPO costs against DPO there; the other methods are skipped at
    # η = 0, to keep `make sweep` near an hour.
    sweep_clean_methods: tuple[str, ...] = setting(
        ("dpo", "ropo", "ropo_auto"), "the methods of sweep_methods that also run at noise 0"
    )

    def __post_init__(self) -> None:
        # Checked here, before any stage runs: a bad value would otherwise surface only after
        # minutes of SFT, when a stage first reads it.
        for name in COUNTS:
            check_range(name, getattr(self, name), 1, None)
        check_range("sft_lr", self.sft_lr, 0.0, None, low_open=True)
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
        # The keys a preference run takes under `ropo train`'s own names: checked by its config.
        ropo_keys = {"rho": self.rho, "alpha": self.alpha, "rs_k": self.rs_k}
        build_config({**self.run_keys(), "noise": self.noise, **ropo_keys})
        told_nothing = [m for m in self.methods if equals_dpo(m, self.noise)]
        if told_nothing:
            raise ValueError(
                f"config key 'methods' has {','.join(told_nothing)} at noise=0, where ε = 0 "
                "makes them plain DPO: drop them from methods or set noise > 0"
            )
        check_range("threads", self.threads, 0, None)
        check_range("jobs", self.jobs, 1, None)
        self.check_sweep()

    def run_keys(self) -> dict[str, Any]:
        """The `ropo train` keys every preference run takes from these settings (stages.py adds
        its files, flip rate and seed; methods.py the keys of its method)."""
        return {
            "lr": self.lr,
            "beta": self.beta,
            "batch_size": self.batch_size,
            "rs_temperature": self.temperature,
            "rs_max_new_tokens": self.max_new_tokens,
            "device": self.device,
        }

    def check_sweep(self) -> None:
        """The sweep keys: distinct seeds >= 0 and noise rates in [0, 0.5), DPO among the methods
        (every comparison is against it), and no dpo_clean (DPO at noise 0 is clean DPO)."""
        for name in ("sweep_seeds", "sweep_noises"):
            check_distinct(name, getattr(self, name))
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


# The task's own settings that count something and must be at least 1. rounds and
# epochs_per_round are here too: the task multiplies them into DPO's epochs.
COUNTS = (
    "n_sft n_train_prompts n_heldout_prompts min_len dim n_layers n_heads sft_steps "
    "sft_batch_size max_new_tokens rounds epochs_per_round eval_samples"
).split()

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
