"""Settings of the constraint task: what `python -m ropo_constraints key=value ...` may change.

One frozen dataclass, read with ropo's `load_settings` (the parsing and type checks of `ropo
train`'s keys) and checked here, before any stage runs. The defaults are the GPU run of
docs/real_model.md; the stages (stages.py) read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ropo.config import FilterSettings, LossSettings
from ropo.config_fields import (
    TEMPLATES,
    check_choice,
    check_device,
    check_range,
    describe_settings,
    setting,
)

METHODS = ("dpo", "ropo", "ropo_auto")


@dataclass(frozen=True)
class ConstraintSettings:
    out: str = setting("", "directory for every stage's files and the report (required)")
    model: str = setting("smollm2-135m", "the instruct model: a preset name or a model directory")
    template: str = setting("auto", "chat template of prompts (auto = the model's own)")
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    dtype: str = setting("float32", "weights dtype for sampling and training")
    seed: int = setting(0, "seeds the prompts and the sampling of responses")
    n_train_prompts: int = setting(2000, "prompts sampled for preference pairs (ties give none)")
    n_heldout_prompts: int = setting(300, "prompts the policies are evaluated on")
    k: int = setting(4, "responses sampled per training prompt")
    temperature: float = setting(0.8, "sampling temperature of the K responses")
    max_new_tokens: int = setting(64, "length limit of every response (sampled and evaluated)")
    gen_batch_size: int = setting(128, "prompts answered at once by the sampler")
    noise: str = setting("0,0.2,0.4", "comma-separated label-flip rates injected by ropo train")
    seeds: str = setting("0,1,2", "comma-separated training seeds (noise draw and data order)")
    methods: str = setting(
        "dpo,ropo,ropo_auto",
        "comma-separated methods: dpo, ropo (fixed rho), ropo_auto (rho=auto with the policy's "
        "preference ranking and a restarted DPO last round, ropo's docs/method.md 3b)",
    )
    lora_rank: int = setting(16, "LoRA rank of the trained adapters (0 = full fine-tuning)")
    lr: float = setting(1e-4, "peak learning rate of every training run")
    beta: float = setting(0.1, "DPO/ROPO beta")
    batch_size: int = setting(16, "pairs per optimizer step")
    epochs: int = setting(1, "epochs per round; DPO trains rounds * epochs in its one round")
    rounds: int = setting(FilterSettings.rounds, "ROPO's train-then-filter rounds")
    rho: float | str = setting(
        FilterSettings.rho, "share of pairs ROPO drops after each round, or auto (estimated)"
    )
    alpha: float = setting(LossSettings.alpha, "ROPO's trade-off alpha")
    max_length: int = setting(256, "prompt + response tokens in training")
    threads: int = setting(0, "torch CPU threads (0 = torch's default)")

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("config key 'out' is required: the directory for the stages' files")
        check_device(self.device)
        check_choice("template", self.template, TEMPLATES)
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for name in ("n_train_prompts", "n_heldout_prompts", "max_new_tokens", "gen_batch_size"):
            check_range(name, getattr(self, name), 1, None)
        for name in ("batch_size", "epochs", "rounds", "max_length"):
            check_range(name, getattr(self, name), 1, None)
        check_range("k", self.k, 2, None)  # a pair needs two responses
        check_range("temperature", self.temperature, 0.0, None, low_open=True)
        check_range("lora_rank", self.lora_rank, 0, None)
        check_range("threads", self.threads, 0, None)
        FilterSettings(rho=self.rho)  # the checks of ropo train's rho (a share, or auto)
        for rate in self.noise_rates:
            check_range("noise", rate, 0.0, 0.5, high_open=True)
        for seed in self.seed_list:
            check_range("seeds", seed, 0, None)
        unknown = [m for m in self.method_names if m not in METHODS]
        if unknown:
            raise ValueError(
                f"config key 'methods' = {self.methods!r}: {', '.join(unknown)} not among "
                f"{', '.join(METHODS)}"
            )

    @property
    def noise_rates(self) -> tuple[float, ...]:
        return tuple(float(x) for x in _items("noise", self.noise, float))

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(int(x) for x in _items("seeds", self.seeds, int))

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(_items("methods", self.methods, str))


def _items(key: str, text: str, kind: type) -> list:
    """The distinct comma-separated values of `text`, each read as `kind`; ValueError naming
    the key otherwise."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = [kind(part) for part in parts if part]
    except ValueError:
        raise ValueError(
            f"config key '{key}' = {text!r} must be comma-separated {kind.__name__} values"
        ) from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"config key '{key}' = {text!r} must list distinct values, at least one")
    return values


def describe_constraint_settings() -> str:
    """Every key with its default and meaning (the --help)."""
    return describe_settings(ConstraintSettings)
