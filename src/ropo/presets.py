"""Named models and datasets of the paper, resolved to local paths.

Nothing is downloaded at run time: a preset name points into $MODELS_DIR (default ./models) or
$DATA_DIR (default ./data), and a missing directory or file is an error that says exactly what to
put where and how to obtain it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ropo.data_formats import check_jsonl_file

MODEL_PRESETS = {
    # name: (directory under $MODELS_DIR, where to get it)
    "llama2-7b": ("Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf (gated: accept the licence first)"),
    "mistral-7b": ("Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1"),
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
    "config.json, tokenizer.model and model.safetensors (or model-*.safetensors + "
    "model.safetensors.index.json)"
)


def resolve_model(name_or_path: str) -> Path:
    """A model directory: the path itself, or $MODELS_DIR/<preset directory>."""
    if not name_or_path:
        raise ValueError(
            "config key 'model' is empty: give a model directory or one of "
            f"{', '.join(MODEL_PRESETS)}"
        )
    if name_or_path in MODEL_PRESETS:
        subdir, source = MODEL_PRESETS[name_or_path]
        path = Path(os.environ.get("MODELS_DIR", "models")) / subdir
        if not (path / "config.json").is_file() or not (path / "tokenizer.model").is_file():
            raise FileNotFoundError(
                f"model preset '{name_or_path}' expects {MODEL_FILES} in {path.resolve()}.\n"
                f"Obtain them from the Hugging Face repository {source}, e.g.\n"
                f"  huggingface-cli download {source.split()[0]} --local-dir {path}\n"
                f"or set MODELS_DIR to the folder that holds {subdir}/."
            )
        return path
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist (expected {MODEL_FILES}; "
            f"presets: {', '.join(MODEL_PRESETS)})"
        )
    return path


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
