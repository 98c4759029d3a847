"""A llama.cpp GGUF file -> a Hugging Face model directory that load_model reads.

`ropo convert-gguf FILE OUT_DIR` and the smollm2-135m preset (presets.py) call convert_gguf. It
reads general.architecture = llama with a byte-level BPE tokenizer (tokenizer.ggml.model = gpt2)
and writes config.json + model.safetensors (through load.save_weights: Hugging Face names stay in
load.py), tokenizer.json, tokenizer_config.json and generation_config.json.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32 by the gguf package. That is exact
for the file but lossy against the model that was quantised: Q4_1 keeps 4 bits per weight plus a
scale and an offset per block of 32, so the weights are close to, not equal to, the original ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ropo.models.config import ModelConfig
from ropo.models.files import require_regular_file
from ropo.models.gguf_tokenizer import generation_config, tokenizer_config, tokenizer_json
from ropo.models.llama import Transformer
from ropo.models.load import rename, save_weights, tensor_mismatch
from ropo.progress import progress_bar

# GGUF tensor name -> our name (models/llama.py); {i} is the layer index.
GGUF_TO_OURS = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",  # absent when the head is tied to the embedding
}
OURS_TO_GGUF = {ours: name for name, ours in GGUF_TO_OURS.items()}
LAYER = re.compile(r"(blk|layers)\.(\d+)\.")
# Metadata that would change the network if set otherwise: refused, never silently dropped.
MUST_BE = {  # key: (values we convert, what other values would mean)
    "llama.expert_count": ((None, 0), "mixture-of-experts layers"),
    "llama.rope.scaling.type": ((None, "none"), "scaled RoPE"),
}


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> None:
    """Write the Hugging Face model directory `out_dir` (float32 weights) from `gguf_file`.

    out_dir must be new or empty. Everything is written into a temporary sibling directory that
    is renamed at the end, so an interrupted or failed conversion leaves no partial model behind.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"{out_dir}: exists and is not an empty directory; convert into a new or empty one"
        )
    reader = open_gguf(gguf_file)
    metadata = {key: field_value(field) for key, field in reader.fields.items()}
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = model_config(metadata, tensor_names, gguf_file)
    tokenizer = tokenizer_json(metadata, gguf_file)  # refuses an unknown tokenizer before the work
    if len(tokenizer["model"]["vocab"]) > config.vocab_size:
        raise ValueError(
            f"{gguf_file}: tokenizer.ggml.tokens has {len(tokenizer['model']['vocab'])} tokens, "
            f"more than the {config.vocab_size} rows of the embedding (llama.vocab_size)"
        )
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(config, read_weights(reader, config, gguf_file), tmp)
        _write_json(tmp / "tokenizer.json", tokenizer)
        settings = tokenizer_config(metadata, tokenizer, config.max_position_embeddings)
        _write_json(tmp / "tokenizer_config.json", settings)
        _write_json(tmp / "generation_config.json", generation_config(metadata))
        os.replace(tmp, out_dir)  # an empty out_dir is replaced; a non-empty one raises OSError
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_gguf(gguf_file: Path) -> Any:
    """A gguf.GGUFReader over `gguf_file`; errors name the file, or say how to install gguf."""
    try:
        import gguf
    except ImportError:
        raise ValueError(
            "convert-gguf needs the gguf package: pip install 'ropo[gguf]' (or pip install gguf)"
        ) from None
    require_regular_file(gguf_file, f"GGUF file {gguf_file} does not exist")
    try:
        return gguf.GGUFReader(gguf_file)
    except (ValueError, IndexError, KeyError) as err:  # bad magic, truncated, unknown type
        raise ValueError(f"{gguf_file}: not a readable GGUF file ({err})") from None


def field_value(field: Any) -> Any:
    """A GGUF metadata field as Python: a str, int, float or bool, or a list of them."""
    from gguf import GGUFValueType

    values = [field.parts[i] for i in field.data]  # the parts that hold the value(s)
    if field.types[-1] == GGUFValueType.STRING:  # an array's last type is its items' type
        values = [bytes(value).decode("utf-8") for value in values]
    else:
        values = [value.tolist()[0] for value in values]  # each a one-element numpy array
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def model_config(metadata: dict[str, Any], tensor_names: set[str], source: Path) -> ModelConfig:
    """The ModelConfig that the file's llama.* metadata describes; the head is tied to the
    embedding exactly when the file has no output.weight."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"{source}: general.architecture is {architecture!r}; convert-gguf supports llama"
        )
    for key, (allowed, meaning) in MUST_BE.items():
        if metadata.get(key) not in allowed:
            raise ValueError(
                f"{source}: {key} is {metadata[key]!r}; convert-gguf supports no {meaning}"
            )

    def number(key: str, default: float | None = None) -> Any:
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{source}: metadata field llama.{key} is missing")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: llama.{key} is {value!r}; expected a positive number")
        return value

    dim, n_heads = number("embedding_length"), number("attention.head_count")
    head_dim = number("attention.key_length", dim // n_heads)
    if number("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{source}: llama.rope.dimension_count is {metadata['llama.rope.dimension_count']}, "
            f"but a head has {head_dim} dimensions; convert-gguf supports RoPE over whole heads"
        )
    fields = dict(
        vocab_size=number("vocab_size", len(metadata.get("tokenizer.ggml.tokens") or ()) or None),
        dim=dim,
        n_layers=number("block_count"),
        n_heads=n_heads,
        n_kv_heads=number("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        intermediate_size=number("feed_forward_length"),
        norm_eps=_shortest_float32(number("attention.layer_norm_rms_epsilon")),
        rope_theta=_shortest_float32(number("rope.freq_base", 10000.0)),
        max_position_embeddings=number("context_length"),
        sliding_window=None,
        tie_word_embeddings="output.weight" not in tensor_names,
        architecture="LlamaForCausalLM",
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )
    try:
        return ModelConfig(**fields)
    except ValueError as err:  # e.g. heads that do not divide into key/value groups
        raise ValueError(f"{source}: {err}") from None


def read_weights(reader: Any, config: ModelConfig, source: Path) -> dict[str, torch.Tensor]:
    """Our-named float32 weights: dequantised, (out, in) as PyTorch stores them, q/k rows back in
    half-split order. Missing, unexpected and misshapen tensors raise ValueError naming them."""
    from gguf.quants import dequantize

    with torch.device("meta"):  # shapes only
        expected = {name: tuple(p.shape) for name, p in Transformer(config).named_parameters()}
    weights, found, unexpected, wrong = {}, set(), [], []
    for tensor in progress_bar(reader.tensors, desc="convert", unit="tensor"):
        ours = rename(tensor.name, GGUF_TO_OURS, LAYER)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the innermost dim first
        if ours not in expected:
            unexpected.append(tensor.name)
            continue
        found.add(ours)
        if shape != expected[ours]:
            wrong.append(f"{tensor.name} {list(shape)}, expected {list(expected[ours])}")
            continue
        try:
            # A plain view of the memory map: numpy's memmap subclass slows every slice down.
            values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the "
                "installed gguf package cannot dequantise"
            ) from None
        weight = torch.tensor(values, dtype=torch.float32).reshape(shape)  # a copy of the file
        if ours.endswith("attention.wq.weight"):
            weight = unpermute_rope_rows(weight, config.n_heads)
        elif ours.endswith("attention.wk.weight"):
            weight = unpermute_rope_rows(weight, config.n_kv_heads)
        weights[ours] = weight
    missing = sorted(rename(name, OURS_TO_GGUF, LAYER) or name for name in set(expected) - found)
    if missing or unexpected or wrong:
        problems = tensor_mismatch(missing, unexpected, wrong)
        raise ValueError(f"{source}: tensors do not match its metadata; {problems}")
    return weights


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k projection rows (n_heads * D, C) back from llama.cpp's order to the half-split one.

    llama.cpp rotates interleaved pairs, so its converter stored each head's row k * D/2 + j
    (half k, index j) at row 2j + k. Our RoPE, like Hugging Face's, rotates the two halves.
    """
    rows, columns = weight.shape
    D = rows // n_heads
    pairs = weight.reshape(n_heads, D // 2, 2, columns)  # GGUF row 2j + k at [h, j, k]
    return pairs.transpose(1, 2).reshape(rows, columns)  # [h, k, j]: row k * D/2 + j


def _shortest_float32(value: float) -> float:
    # GGUF stores float32, so 1e-5 reads back as 9.99999975e-06; the shortest decimal that gives
    # the same float32 is the value the original config.json held.
    return float(str(np.float32(value)))


def _write_json(target: Path, data: dict[str, Any]) -> None:
    target.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
