"""Model and data presets (presets.py): what a missing input says, and the smollm2-135m cache.

Converting the real smollm2-135m GGUF is tested (slow) in test_gguf.py.
"""

from pathlib import Path

import pytest

from ropo.presets import resolve_inputs, resolve_model


@pytest.fixture(autouse=True)
def empty_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))


def test_missing_7b_preset_asks_for_an_sft_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        resolve_model("mistral-7b")
    message = str(caught.value)
    assert f"expects an SFT checkpoint in {tmp_path / 'models' / 'Mistral-7B-sft'}" in message
    assert "not from a base model" in message
    # either a published instruct checkpoint, or `ropo sft` on the base model
    assert "huggingface-cli download mistralai/Mistral-7B-Instruct-v0.2" in message
    assert "fine-tune the base model mistralai/Mistral-7B-v0.1" in message
    assert "ropo sft model=" in message


def test_one_missing_input_is_reported_alone(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(FileNotFoundError) as caught:
        resolve_inputs("llama2-7b", str(data), "plain")
    assert str(caught.value).startswith("model preset 'llama2-7b' expects an SFT checkpoint")


def test_every_missing_input_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        resolve_inputs("llama2-7b", "tldr", "plain")
    message = str(caught.value)
    assert message.startswith("2 inputs are missing:\n(1) model preset 'llama2-7b'")
    assert f"\n(2) data preset 'tldr' expects the JSONL file {tmp_path}/data/tldr/" in message


def test_a_converted_smollm2_directory_is_reused(tmp_path: Path) -> None:
    converted = tmp_path / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # written last by convert_gguf
    assert resolve_model("smollm2-135m") == converted
    assert [p.name for p in converted.iterdir()] == ["config.json"]  # not converted again


def test_an_empty_model_key_lists_every_preset() -> None:
    with pytest.raises(ValueError, match="llama2-7b, mistral-7b, smollm2-135m"):
        resolve_model("")
