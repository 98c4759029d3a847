"""Settings of the constraint task: what `python -m ropo_constraints key=value ...` may change.

One frozen dataclass, read with ropo's `load_settings` (the parsing and type checks of `ropo
train`'s keys) and checked here, before any stage runs. The defaults are the GPU run of
docs/real_model.md; the stages (stages.py) read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ropo.config import DataFileSettings, FilterSettings, LossSettings, OptimSettings
from ropo.config_fields import (
    check_distinct,
    check_range,
    check_required,
    describe_settings,
    setting,
    setting_like,
)
from ropo.config_machinery import PolicySettings

METHODS = ("dpo", "ropo", "ropo_auto")


@dataclass(frozen=True)
class ConstraintSettings:
    out: str = setting("", "directory for every stage's files and the report (required)")
    model: str = setting("smollm2-135m", "the instruct model: a preset name or a model directory")
    template: str = setting_like(DataFileSettings, "template")
    device: str = setting_like(PolicySettings, "device")
    dtype: str = setting_like(PolicySettings, "dtype", note="for sampling and training")
    seed: int = setting(0, "seeds the prompts and the sampling of responses")
    n_train_prompts: int = setting(2000, "prompts sampled for preference pairs (ties give none)")
    n_heldout_prompts: int = setting(300, "prompts the policies are evaluated on")
    k: int = setting(4, "responses sampled per training prompt")
    temperature: float = setting(0.8, "sampling temperature of the K responses")
    max_new_tokens: int = setting(64, "length limit of every response (sampled and evaluated)")
    gen_batch_size: int = setting(128, "prompts answered at once by the sampler")
    # A list key takes comma-separated values (noise=0,0.2); config_load parses them.
    noise: tuple[float, ...] = setting((0.0, 0.2, 0.4), "label-flip rates injected by ropo train")
    seeds: tuple[int, ...] = setting((0, 1, 2), "training seeds (noise draw and data order)")
    methods: tuple[str, ...] = setting(
        METHODS,
        "dpo, ropo (fixed rho), ropo_auto (rho=auto with the policy's preference ranking and a "
        "restarted DPO last round, ropo's docs/method.md 3b)",
    )
    # The training runs' keys, as `ropo train` declares and checks them, with this task's defaults.
    lora_rank: int = setting_like(PolicySettings, "lora_rank", 16)
    lr: float = setting_like(OptimSettings, "lr", 1e-4, "of every training run")
    beta: float = setting_like(LossSettings, "beta")
    batch_size: int = setting_like(OptimSettings, "batch_size", 16)
    epochs: int = setting_like(OptimSettings, "epochs", note="DPO trains rounds * epochs in one")
    rounds: int = setting_like(FilterSettings, "rounds")
    rho: float | str = setting_like(FilterSettings, "rho")
    alpha: float = setting_like(LossSettings, "alpha")
    max_length: int = setting_like(DataFileSettings, "max_length", 256)
    threads: int = setting(0, "torch CPU threads (0 = torch's default)")

    def __post_init__(self) -> None:
        check_required(self, ("out",))
        for name in ("n_train_prompts", "n_heldout_prompts", "max_new_tokens", "gen_batch_size"):
            check_range(name, getattr(self, name), 1, None)
        check_range("k", self.k, 2, None)  # a pair needs two responses
        check_range("temperature", self.temperature, 0.0, None, low_open=True)
        check_range("threads", self.threads, 0, None)
        # The keys declared like `ropo train`'s are checked by its settings classes, the same way.
        PolicySettings(device=self.device, dtype=self.dtype, lora_rank=self.lora_rank)
        DataFileSettings(template=self.template, max_length=self.max_length)
        OptimSettings(lr=self.lr, batch_size=self.batch_size, epochs=self.epochs)
        LossSettings(beta=self.beta, alpha=self.alpha)
        FilterSettings(rounds=self.rounds, rho=self.rho)
        for name in ("noise", "seeds", "methods"):
            check_distinct(name, getattr(self, name))
        for rate in self.noise:
            check_range("noise", rate, 0.0, 0.5, high_open=True)
        for seed in self.seeds:
            check_range("seeds", seed, 0, None)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(
                f"config key 'methods' = {','.join(self.methods)!r}: {', '.join(unknown)} not "
                f"among {', '.join(METHODS)}"
            )


def describe_constraint_settings() -> str:
    """Every key with its default and meaning (the --help)."""
    return describe_settings(ConstraintSettings)
