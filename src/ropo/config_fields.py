"""How a config key is declared, listed and checked: the pieces every command's settings share.

Part of the first stage, the configuration. A key is a field of a frozen dataclass made with
`setting` (its default and help line); its `__post_init__` checks the value with the `check_*`
functions below, so a bad value fails when the config is read, before anything else runs.
`config.py` (`ropo train`), `sft_config.py`, `eval_config.py` and `generate_config.py` build on
them; `SectionedConfig` gathers settings classes into one command's config, and `setting_like`
lets another command (or a task beside the library) take a key as `ropo train` declares it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

# The `template` key of every command that reads chat data: "auto" or a named template of
# models/chat_templates.py (chat_format.py applies it).
TEMPLATES = ("auto", "plain", "llama2-chat", "mistral-instruct")
TEMPLATE_HELP = (
    "chat template of prompts and responses: auto (the model's own chat_template from "
    "tokenizer_config.json or chat_template.jinja; plain if it has none) | plain | "
    "llama2-chat | mistral-instruct"
)
# The `dtype` key's values: the dtypes weights are loaded in (resources.DTYPES maps them to torch).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def setting(default: Any, help: str) -> Any:
    """A config key: its default and the help line `ropo keys` (or a subcommand's --help) shows."""
    return field(default=default, metadata={"help": help})


def setting_like(settings: type, key: str, default: Any = MISSING, note: str = "") -> Any:
    """The key `key` as the settings dataclass `settings` declares it, for another command that
    takes it with the same meaning (`ropo eval`'s template is `ropo train`'s): its help line, then
    `note` (what the other command adds), and its default unless `default` is given."""
    declared = settings.__dataclass_fields__[key]
    help_line = declared.metadata["help"] + (f"; {note}" if note else "")
    return setting(declared.default if default is MISSING else default, help_line)


def setting_help(settings: type, key: str) -> str:
    """The help line of `key` in the settings dataclass `settings`."""
    return settings.__dataclass_fields__[key].metadata["help"]


def describe_settings(settings: type, header: str = "keys (key=value):") -> str:
    """`header`, then every key of the settings dataclass `settings` with its default and help
    line: the --help of a command with one flat set of keys (`ropo generate`, `ropo eval`)."""
    keys = dataclasses.fields(settings)
    defaults = [_as_typed(f.default) for f in keys]
    name_width = max(len(f.name) for f in keys)
    default_width = min(max(len(default) for default in defaults), 20)  # a longer one overflows
    lines = [header]
    for f, default in zip(keys, defaults, strict=True):
        lines.append(f"  {f.name:<{name_width}} {default:<{default_width}} {f.metadata['help']}")
    return "\n".join(lines)


def _as_typed(default: Any) -> str:
    """A default as a user writes it: a tuple key's values comma-separated (sweep_seeds=0,1,2)."""
    return ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)


@dataclass(frozen=True)
class SectionedConfig:
    """The settings of one command: each field is a section (a settings dataclass) whose fields
    are the flat keys. `command` and `keys_help` name the command in errors."""

    command: ClassVar[str] = "ropo train"
    keys_help: ClassVar[str] = "`ropo keys`"

    @classmethod
    def sections(cls) -> dict[str, type]:
        """Section name -> settings class, in declaration order."""
        return {f.name: f.default_factory for f in dataclasses.fields(cls)}

    @classmethod
    def keys(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """Every key -> (its section, its field)."""
        owners = {}
        for section, settings in cls.sections().items():
            for f in dataclasses.fields(settings):
                assert f.name not in owners, f"config key {f.name} declared twice"
                owners[f.name] = (section, f)
        return owners

    def to_flat_dict(self) -> dict[str, Any]:
        """Every key with its resolved value, in declaration order (written beside every run)."""
        flat: dict[str, Any] = {}
        for section in self.sections():
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat


def describe_keys(config: type[SectionedConfig]) -> str:
    """A table of every key of `config`, its default and its meaning, section by section (`ropo
    keys`, `ropo sft --help`)."""
    lines = []
    for section, cls in config.sections().items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name:<26} {f.default!r:<16} {f.metadata['help']}")
    return "\n".join(lines)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming `name` and `value` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"config key '{name}' = {value!r} is not one of {', '.join(choices)}")


def check_required(settings: Any, keys: tuple[str, ...]) -> None:
    """ValueError naming the first of `keys` that `settings` leaves empty, with its help line."""
    for key in keys:
        if not getattr(settings, key):
            help_line = setting_help(type(settings), key)
            raise ValueError(f"config key '{key}' is required: {help_line}")


def check_distinct(name: str, values: tuple) -> None:
    """ValueError naming `name` unless the list key's `values` hold at least one value, none
    twice."""
    if not values or len(set(values)) != len(values):
        raise ValueError(
            f"config key '{name}' = {_as_typed(values)!r} must list distinct values, at least one"
        )


def check_device(value: str) -> None:
    """ValueError naming the key unless `value` is auto, cpu, cuda or cuda:N (N = 0, 1, ...)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError(
            f"config key 'device' = {value!r} is not one of auto, cpu, cuda, cuda:N "
            "(N = 0, 1, ... the GPU index)"
        )


def check_range(
    name: str,
    value: float,
    low: float | None,
    high: float | None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ValueError naming `name` and `value` unless it is finite and within [low, high] (None: no
    bound; *_open: that end excluded). The built-in task's settings use it too."""
    bad = isinstance(value, float) and not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"config key '{name}' = {value!r} must be {bounds}")


# The loss keys get checks of their own, whose messages say why the bound is where it is. They
# run when the config is read and nowhere else: the loss functions trust their arguments.
def check_beta(beta: float) -> None:
    """ValueError unless the DPO beta is a finite number > 0."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"config key 'beta': beta must be a finite number > 0, got {beta!r}")


def check_alpha(alpha: float) -> None:
    """ValueError unless ROPO's alpha is a finite number > 2, and why."""
    if not (math.isfinite(alpha) and alpha > 2):
        raise ValueError(
            f"config key 'alpha': ROPO alpha must be a finite number > 2, got {alpha!r}: only "
            "for alpha > 2 does a pair the model confidently contradicts (t → −∞, gradient "
            "weight 4α/(1+α)²) get less gradient than an ambiguous one (t = 0, weight "
            "4α/(1+α)² · (2+α)/4)"
        )


def check_label_smoothing(label_smoothing: float) -> None:
    """ValueError unless the flip rate epsilon of cDPO/rDPO is in [0, 0.5)."""
    # ε ≥ 0.5 would mean the labels are more often wrong than right; rDPO divides by 1 − 2ε.
    if not (math.isfinite(label_smoothing) and 0 <= label_smoothing < 0.5):
        raise ValueError(
            f"config key 'label_smoothing': label_smoothing must be in [0, 0.5), got "
            f"{label_smoothing!r} (it is the assumed flip rate; at 0.5 labels carry no signal)"
        )
