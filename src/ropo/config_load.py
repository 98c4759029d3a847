"""Loading a RunConfig (or `ropo sft`'s SftConfig): the step that fills the dataclasses of
`config.py`.

Values come from an optional YAML file (read with `yaml.safe_load`; a key given twice is refused)
and then from `key=value` overrides on the command line; an unknown key, a wrong type or a bad
value is an error that names the key and where it came from (file:line, or the command line).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ropo.config import RunConfig
from ropo.config_fields import SectionedConfig

Settings = TypeVar("Settings")
Config = TypeVar("Config", bound=SectionedConfig)


def build_config(
    values: dict[str, Any],
    origins: dict[str, str] | None = None,
    config: type[Config] = RunConfig,
) -> Config:
    """`config` (RunConfig, or SftConfig for `ropo sft`) from flat key -> value pairs; `origins`
    says where each value came from."""
    origins = origins or {}
    keys, sections = config.keys(), config.sections()
    per_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in values.items():
        where = origins.get(key, "config")
        if key not in keys:
            hint = difflib.get_close_matches(key, keys, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(
                f"{where}: unknown config key '{key}'{suggestion}; {config.keys_help} lists "
                "them all"
            )
        section, f = keys[key]
        per_section[section][key] = _coerce(key, value, f, where, owner=sections[section])
    try:
        return config(**{name: cls(**per_section[name]) for name, cls in sections.items()})
    except ValueError as err:
        bad_key = str(err).split("'")[1] if "'" in str(err) else ""
        where = origins.get(bad_key, "")
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


# Keys a resumed run may change: they do not alter what is computed (skip_nonfinite only
# decides what a NaN/inf step does, so a run that stopped on one can go on past it).
RESUMABLE_KEYS = ("resume", "out", "overwrite", "device", "log_every", "save_every",
                  "skip_nonfinite", "term_grace", "save_dtype")  # fmt: skip


def load_config(
    config_file: str | Path | None,
    overrides: list[str],
    base: dict[str, Any] | None = None,
    config: type[Config] = RunConfig,
) -> Config:
    """Read `base` (a resumed run's config), the YAML file, then `key=value` overrides; validate
    them as keys of `config` (RunConfig: `ropo train`; SftConfig: `ropo sft`)."""
    if base is not None:
        _check_same_command(base, config)
    values: dict[str, Any] = dict(base or {})
    origins: dict[str, str] = {key: "resumed run.json" for key in values}
    if config_file:
        path = Path(config_file)
        if path.is_dir():
            raise ValueError(f"{path}: is a directory; --config expects a YAML file of key: value")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not valid UTF-8 (byte {err.start})") from None
        loaded = _parse_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{path}: expected a mapping of key: value, got {type(loaded).__name__}"
            )
        lines = text.splitlines()
        for key, value in loaded.items():
            line_no = next((i + 1 for i, line in enumerate(lines) if line.startswith(f"{key}:")), 0)
            values[str(key)] = value
            origins[str(key)] = f"{path}:{line_no}" if line_no else str(path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"command line: expected key=value, got '{item}'")
        origins[key] = f"command line '{item}'"
        values[key] = _parse_yaml(raw, origins[key]) if raw != "" else ""
    if base is not None:
        _check_resume_place(values, origins, base)
        changed = [k for k in values if k not in RESUMABLE_KEYS and values[k] != base.get(k)]
        if changed:
            raise ValueError(
                f"resume: {', '.join(changed)} differ from the resumed run's config; "
                f"a resumed run must compute the same thing (only "
                f"{', '.join(RESUMABLE_KEYS)} may change)"
            )
    return build_config(values, origins, config)


def _check_same_command(base: dict[str, Any], config: type[SectionedConfig]) -> None:
    """A run is resumed by the command that started it: its run.json holds that command's keys."""
    foreign = [key for key in base if key not in config.keys()]
    if foreign:
        raise ValueError(
            f"resume: the resumed run.json has config keys that {config.command} does not take "
            f"({', '.join(foreign[:4])}): the directory holds a run of another ropo command; "
            "resume it with the command that started it"
        )


def load_settings(cls: type[Settings], overrides: list[str], command: str) -> Settings:
    """A frozen settings dataclass of another command (`ropo generate`) from `key=value` words,
    parsed, type-checked and reported as `ropo train`'s keys are; `command` names it in errors."""
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        where = f"command line '{item}'"
        if not sep or not key:
            raise ValueError(f"command line: expected key=value, got '{item}'")
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(
                f"{where}: unknown key '{key}'{suggestion}; `{command} --help` lists them all"
            )
        value = _parse_yaml(raw, where) if raw != "" else ""
        field = next(f for f in dataclasses.fields(cls) if f.name == key)
        values[key], origins[key] = _coerce(key, value, field, where, owner=cls), where
    try:
        return cls(**values)
    except ValueError as err:
        bad_key = str(err).split("'")[1] if "'" in str(err) else ""
        where = origins.get(bad_key, "")
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


def _check_resume_place(values: dict[str, Any], origins: dict[str, str], base: dict) -> None:
    """A resumed run continues in its own directory: `out` and `overwrite` would be ignored."""
    resume = Path(str(values.get("resume", "")))
    for key in ("out", "overwrite"):
        if origins.get(key, "resumed run.json") == "resumed run.json":
            continue  # not given now: the value the run started with
        if key == "out" and Path(str(values[key])).resolve() == resume.resolve():
            continue
        raise ValueError(
            f"{origins[key]}: resume={resume} continues the run in {resume}, so {key}= cannot "
            f"apply; drop {key}= (to start over elsewhere, run without resume=)"
        )


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load (plain data, never objects or code); a syntax error or a key set twice
    becomes a ValueError naming `where`."""
    try:
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), where)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{where}: not valid YAML: {problem}{at}") from None


def _check_unique_keys(node: yaml.Node | None, where: str) -> None:
    """ValueError naming both lines if the top mapping sets a key twice: yaml.safe_load keeps the
    last value without a word, so `rho: 0.1` on line 2 would lose to `rho: 0.3` on line 40."""
    if not isinstance(node, yaml.MappingNode):
        return
    first_lines: dict[str, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # not a config key at all; build_config names it
        line = key_node.start_mark.line + 1
        if key_node.value in first_lines:
            raise ValueError(
                f"{where}:{line}: key '{key_node.value}' is set twice (also on line "
                f"{first_lines[key_node.value]}); keep one (YAML would silently use the last)"
            )
        first_lines[key_node.value] = line


def _coerce(key: str, value: Any, f: dataclasses.Field, where: str, owner: type) -> Any:
    expected = typing.get_type_hints(owner)[key]
    if typing.get_origin(expected) is tuple:  # tuple[int, ...]: a list of values
        return _coerce_items(key, value, typing.get_args(expected)[0], where)
    if not isinstance(expected, types.UnionType):
        return _coerce_to(key, value, expected, where)
    # A key that takes a number or a word (rho: 0.2 or auto) tries the types in declared order;
    # the settings class then checks which words it accepts.
    kinds = [t for t in typing.get_args(expected) if t is not type(None)]
    for kind in kinds[:-1]:
        try:
            return _coerce_to(key, value, kind, where)
        except ValueError:
            pass
    return _coerce_to(key, value, kinds[-1], where)


def _coerce_items(key: str, value: Any, kind: type, where: str) -> tuple:
    """A list key's values as a tuple of `kind`, from a YAML list or from comma-separated values
    (`sweep_seeds=0,1,2` on the command line; a single value is a list of one)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, str):
        items = [_parse_yaml(item, where) for item in value.split(",") if item.strip()]
    try:
        return tuple(_coerce_to(key, item, kind, where) for item in items)
    except ValueError:
        raise ValueError(
            f"{where}: config key '{key}' expects {kind.__name__} values separated by commas, "
            f"got {value!r}"
        ) from None


def _coerce_to(key: str, value: Any, expected: type, where: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. model: 7 would be odd, but a numeric run name is fine
    if expected is str and value is None:
        return ""
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(
            f"{where}: config key '{key}' expects {expected.__name__}, "
            f"got {value!r} ({type(value).__name__})"
        )
    return value
