"""The settings of `ropo eval`: one frozen dataclass, read from `key=value` words.

`config_load.load_settings` parses and checks the words as it does `ropo train`'s keys. When the
model is a run's final/ (its run.json one directory up), the run's own settings fill every key
the command line leaves out: reference (the run's reference), beta, format, template, max_length and
dtype, so that held-out pairs are tokenised and scored as the run's training pairs were.
eval_run.py reads the settings; this file imports no torch, so `ropo eval --help` stays quick.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ropo.config import DataFileSettings
from ropo.config_fields import (
    check_beta,
    check_range,
    check_required,
    describe_settings,
    setting,
    setting_like,
)
from ropo.config_load import load_settings
from ropo.config_machinery import PolicySettings
from ropo.presets import resolve_model
from ropo.run_dir import read_run_info

# Keys a run's run.json supplies when `model` is its final/ (reference: the run's `reference`,
# or its `model` when that was the reference).
FROM_RUN = ("beta", "format", "template", "max_length", "dtype")


@dataclass(frozen=True)
class EvalSettings:
    model: str = setting("", "the policy: an HF model directory, e.g. a run's final/")
    data: str = setting("", "preference file, in any format `ropo train` reads (or a data preset)")
    reference: str = setting("", "the reference model ('' = the run's model, for a run's final/)")
    # Tokenised as `ropo train` tokenises, so these three mean what they mean there.
    format: str = setting_like(DataFileSettings, "format")
    template: str = setting_like(DataFileSettings, "template")
    max_length: int = setting_like(DataFileSettings, "max_length")
    beta: float = setting(0.1, "beta of the implicit reward beta*log(pi/pi_ref) and the DPO loss")
    batch_size: int = setting(16, "pairs scored at once")
    out: str = setting("", "JSON file for the results ('' = standard output)")
    per_pair: bool = setting(False, "also write <out without suffix>.pairs.jsonl: margins by id")
    device: str = setting_like(PolicySettings, "device")
    dtype: str = setting_like(PolicySettings, "dtype")

    def __post_init__(self) -> None:
        check_required(self, ("model", "data"))
        # The keys declared like `ropo train`'s are checked by its settings classes, the same way.
        DataFileSettings(format=self.format, template=self.template, max_length=self.max_length)
        PolicySettings(device=self.device, dtype=self.dtype)
        check_beta(self.beta)
        check_range("batch_size", self.batch_size, 1, None)
        if self.per_pair and not self.out:
            raise ValueError(
                "config key 'per_pair' = True needs out=FILE: the per-pair file is written next "
                "to it (FILE without its suffix, plus .pairs.jsonl)"
            )


def describe_eval_settings() -> str:
    """Every key of `ropo eval` with its default and meaning (its --help)."""
    header = (
        "keys (key=value); for a run's final/ the run's own reference (its model unless it set\n"
        "reference=), beta, format, template, max_length and dtype are the defaults (read from\n"
        "the run's run.json):"
    )
    return describe_settings(EvalSettings, header)


def load_eval_settings(words: list[str]) -> EvalSettings:
    """EvalSettings from `key=value` words; for a run's final/, the run's settings fill the keys
    not given (see the module docstring). ValueError naming the key or file when one is wrong."""
    settings = load_settings(EvalSettings, words, "ropo eval")
    given = {word.partition("=")[0] for word in words}
    run_json = run_of_final(resolve_model(settings.model))
    if run_json is None:
        if not settings.reference:
            raise ValueError(
                f"command line: reference= is required: {settings.model} is not a run's final/ "
                "(a folder final/ next to a run.json), so the model it was trained from is "
                "unknown; give reference=DIR"
            )
        return settings
    run_config = read_run_info(run_json.parent)["config"]
    defaults = {key: run_config[key] for key in FROM_RUN if key in run_config}
    if "model" in run_config:
        source = "reference" if run_config.get("reference") else "model"
        defaults["reference"] = run_config[source]
    defaults = {key: value for key, value in defaults.items() if key not in given}
    if "reference" in defaults:
        try:
            resolve_model(defaults["reference"])
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(
                f"{run_json}: the run's {source} is the default reference, but: {err}; give "
                "reference=DIR"
            ) from None
    try:
        return dataclasses.replace(settings, **defaults)
    except ValueError as err:
        raise ValueError(f"{run_json}: {err}") from None


def run_of_final(model_dir: Path) -> Path | None:
    """The run.json of the run whose final/ `model_dir` is (symlinks followed), else None."""
    model_dir = model_dir.resolve()
    run_json = model_dir.parent / "run.json"
    return run_json if model_dir.name == "final" and run_json.is_file() else None
