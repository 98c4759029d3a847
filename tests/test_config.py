"""Config: YAML + key=value overrides, typed, validated, unknown keys refused with their origin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ropo
from ropo.config import KEYS, SECTIONS, RunConfig
from ropo.config_fields import describe_keys
from ropo.config_load import load_config


def test_overrides_are_typed_and_reach_their_section() -> None:
    cfg = load_config(None, ["noise=0.4", "loss=dpo", "lr=1e-5", "rounds=2", "model=some/dir"])
    assert cfg.data.noise == 0.4
    assert cfg.loss.loss == "dpo"
    assert cfg.optim.lr == 1e-5  # YAML 1.1 reads "1e-5" as a string; we still accept it
    assert cfg.filter.rounds == 2
    assert cfg.model.model == "some/dir"


def test_yaml_file_then_command_line(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("loss: ropo\nalpha: 30\nrho: 0.3\n")
    cfg = load_config(config_file, ["rho=0.1"])
    assert cfg.loss.alpha == 30.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.filter.rho == 0.1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nosie=0.1", "unknown config key 'nosie' (did you mean 'noise'?)"),
        ("noise=abc", "config key 'noise' expects float"),
        ("noise=0.5", "config key 'noise' = 0.5 must be >= 0.0 and < 0.5"),
        ("rounds=1.5", "config key 'rounds' expects int"),
        ("loss=foo", "'foo' is not one of dpo, ipo, cdpo, rdpo, ropo"),
        ("batch_size=0", "config key 'batch_size' = 0 must be >= 1"),
        ("rejection_sampling=maybe", "expects bool"),
        ("noise", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key_and_origin(override: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("loss: ropo\nbetta: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:2: unknown config key 'betta'"):
        load_config(config_file, [])
    config_file.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(config_file, [])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml", [])


def test_resume_refuses_a_changed_computation() -> None:
    base = load_config(None, ["model=m", "data=d"]).to_flat_dict()
    assert load_config(None, ["resume=runs/x", "device=cpu"], base=base).run.resume == "runs/x"
    with pytest.raises(ValueError, match="resume: lr differ"):
        load_config(None, ["resume=runs/x", "lr=0.1"], base=base)


def test_every_key_is_documented() -> None:
    table = describe_keys(RunConfig)
    for key, (_, field) in KEYS.items():
        assert field.metadata["help"], key
        assert key in table
    for required in (
        "model",
        "data",
        "format",
        "noise",
        "loss",
        "beta",
        "alpha",
        "rho",
        "rounds",
        "epochs",
        "lr",
        "batch_size",
        "max_length",
        "seed",
        "out",
        "resume",
        "device",
        "dtype",
    ):
        assert required in KEYS


def test_shipped_configs_load() -> None:
    for config_file in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        load_config(config_file, [])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepts_auto_cpu_and_cuda_indices(device: str) -> None:
    assert load_config(None, [f"device={device}"]).model.device == device


@pytest.mark.parametrize("device", ["tpu", "CPU", "cuda:abc", "meta", "cuda:-1", "cuda:1.5"])
def test_device_refuses_anything_else(device: str) -> None:
    with pytest.raises(ValueError, match=f"config key 'device' = '{device}' is not one of"):
        load_config(None, [f"device={device}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("alpha=1.5", "config key 'alpha': ROPO alpha must be a finite number > 2, got 1.5"),
        ("alpha=2", "got 2.0"),  # the bound itself is excluded
        ("label_smoothing=0.6", "config key 'label_smoothing': label_smoothing must be in"),
        ("label_smoothing=0.5", "got 0.5"),
        ("beta=-1", "config key 'beta': beta must be a finite number > 0, got -1.0"),
    ],
)
def test_loss_keys_are_checked_with_the_config_whatever_the_loss(
    override: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, ["loss=dpo", override])  # dpo uses neither alpha nor label_smoothing


def test_a_key_set_twice_in_yaml_names_both_lines(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("loss: ropo\nrho: 0.1\nseed: 3\nrho: 0.3\n")
    with pytest.raises(ValueError, match=r"run\.yaml:4: key 'rho' is set twice \(also on line 2\)"):
        load_config(config_file, [])
    config_file.write_text("loss: ropo\nrho: 0.1\nseed: 3\n")  # each key once: fine
    assert load_config(config_file, []).filter.rho == 0.1


def test_a_directory_is_no_config_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path}: is a directory; --config expects a YAML"):
        load_config(tmp_path, [])


SOURCE = Path(ropo.__file__).parent
CONFIG_FILES = ("config.py", "config_machinery.py", "config_fields.py", "config_load.py")
READERS = {
    path: path.read_text()
    for path in sorted(SOURCE.rglob("*.py"))
    if path not in [SOURCE / name for name in CONFIG_FILES]
}


def is_read(key: str, section: str) -> bool:
    """Whether a module outside the config reads `key`: as `cfg.data.noise`, as `cfg.noise` or
    `data.noise` (a section passed on), or as the string "noise" (a dict key, getattr). For a key
    named like its section (`model`), `cfg.model` is the section: only `cfg.model.model` counts."""
    if key in SECTIONS:
        pattern = rf"\bcfg\.{key}\.{key}\b"
    else:
        pattern = rf"\b(?:cfg|{section})(?:\.{section})?\.{key}\b|[\"']{key}[\"']"
    return any(re.search(pattern, text) for text in READERS.values())


def test_every_key_is_read_somewhere() -> None:
    assert not is_read("eval_every_round", "run")  # listed by `ropo keys` once, never read
    dead = [key for key, (section, _) in KEYS.items() if not is_read(key, section)]
    assert dead == [], f"config keys nothing reads (remove them or use them): {dead}"
