"""The settings of `ropo generate`: one frozen dataclass, read from `key=value` words.

`config_load.load_settings` fills it with the parsing and checks of `ropo train`'s keys, and
`generate.py` reads it. Apart from generate.py, so that the command line can list these keys in
`ropo generate --help` without importing torch for every command.
"""

from __future__ import annotations

from dataclasses import dataclass

from ropo.config import DataFileSettings
from ropo.config_fields import (
    DTYPE_NAMES,
    TEMPLATES,
    check_choice,
    check_device,
    check_range,
    check_required,
    describe_settings,
    setting,
    setting_like,
)
from ropo.config_machinery import PolicySettings

LAYOUTS = ("jsonl", "alpaca_eval", "mt_bench")  # the files of generate_layouts.py


@dataclass(frozen=True)
class GenerateSettings:
    model: str = setting("", "HF model directory (a run's final/, or a preset name)")
    # Prompts are rendered and tokenised as `ropo train` renders the prompt of a pair.
    template: str = setting_like(DataFileSettings, "template")
    prompts: str = setting("", ".jsonl / .json records, or a text file with one prompt per line")
    out: str = setting("", "file to write the responses to (replaced if it exists)")
    layout: str = setting("jsonl", "jsonl | alpaca_eval | mt_bench: the file's layout")
    generator: str = setting("", "name written into the outputs ('' = the model directory's name)")
    max_new_tokens: int = setting(512, "length limit of each response (and of each MT-Bench turn)")
    temperature: float = setting(0.0, "0 = greedy; otherwise sampling at this temperature")
    top_p: float = setting(1.0, "nucleus sampling threshold (with temperature > 0)")
    n: int = setting(1, "responses per prompt (needs temperature > 0)")
    seed: int = setting(0, "seeds the sampling")
    batch_size: int = setting(8, "prompts answered at once (sorted by length to limit padding)")
    device: str = setting_like(PolicySettings, "device")
    dtype: str = setting("auto", "auto (the checkpoint's) | " + " | ".join(DTYPE_NAMES))

    def __post_init__(self) -> None:
        check_required(self, ("model", "prompts", "out"))
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("template", self.template, TEMPLATES)
        check_range("max_new_tokens", self.max_new_tokens, 1, None)
        check_range("temperature", self.temperature, 0.0, None)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("n", self.n, 1, None)
        check_range("batch_size", self.batch_size, 1, None)
        check_device(self.device)
        check_choice("dtype", self.dtype, ("auto", *DTYPE_NAMES))
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"config key 'n' = {self.n} with temperature=0 would give {self.n} identical "
                "greedy responses; set temperature > 0 (e.g. 0.7) or n=1"
            )
        if self.n > 1 and self.layout == "alpaca_eval":
            raise ValueError(
                f"config key 'n' = {self.n}: AlpacaEval scores one output per instruction; use "
                "n=1, or layout=jsonl for several samples per prompt"
            )


def describe_generate_settings() -> str:
    """Every key of `ropo generate` with its default and meaning (its --help)."""
    return describe_settings(GenerateSettings)
