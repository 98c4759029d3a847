"""The settings of `ropo sft`: the sections it shares with `ropo train`, gathered into SftConfig.

Read like `ropo train`'s keys (config_load.load_config with config=SftConfig: YAML, key=value
overrides, resume= with the run's own run.json). The policy, data file, optimizer and run
directory keys mean what they mean for training; SFT has no reference, loss, filter or held-out
keys, takes a larger default learning rate, and may stop after a number of steps. No torch here,
so that `ropo sft --help` stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ropo.config import DataFileSettings, OptimSettings
from ropo.config_fields import SectionedConfig, check_range, describe_keys, setting
from ropo.config_machinery import PolicySettings, RunDirSettings


@dataclass(frozen=True)
class SftDataSettings(DataFileSettings):
    data: str = setting(
        "",
        "JSONL file or data preset: preference pairs in any `format` (the chosen response is "
        'the target), or with format=plain {"prompt", "response"} or {"messages": [...]} records '
        "(the last message, the assistant's, is the target)",
    )


@dataclass(frozen=True)
class SftOptimSettings(OptimSettings):
    epochs: int = setting(1, "passes over the examples (unless steps is set)")
    lr: float = setting(2e-5, "peak AdamW learning rate")
    steps: int = setting(
        0,
        "optimizer steps to train (0 = `epochs` passes); past the end of an epoch the next "
        "one starts with a new order",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("steps", self.steps, 0, None)


@dataclass(frozen=True)
class SftConfig(SectionedConfig):
    """Everything `ropo sft` reads; written into the run's run.json and every checkpoint."""

    command: ClassVar[str] = "ropo sft"
    keys_help: ClassVar[str] = "`ropo sft --help`"

    model: PolicySettings = field(default_factory=PolicySettings)
    data: SftDataSettings = field(default_factory=SftDataSettings)
    optim: SftOptimSettings = field(default_factory=SftOptimSettings)
    run: RunDirSettings = field(default_factory=RunDirSettings)


def describe_sft_settings() -> str:
    """Every key of `ropo sft` with its default and meaning (its --help)."""
    return "keys (key=value, or key: value in --config FILE.yaml):\n" + describe_keys(SftConfig)
