"""Config: YAML + key=value overrides, typed, validated, unknown keys refused with their origin."""

from __future__ import annotations

from pathlib import Path

import pytest

from ropo.config import KEYS, describe_keys
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
    table = describe_keys()
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
