"""Checkpoint loading and saving: sharding both ways, strictness, dtypes, unsupported configs.

transformers writes or reads the other side of every round trip, so the HF layout is the real one.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_fixtures import hf_logits, hf_model, load_hf, max_diff, our_model, random_ids, save_hf
from ropo.models.config import ModelConfig, read_model_config
from ropo.models.files import check_safetensors
from ropo.models.load import load_model, save_model

TOL = 1e-4
TINY_HF = hf_model().config.to_dict()


def edit_single_file(path, edit) -> None:
    """Rewrite path/model.safetensors as edit(tensors) returns it."""
    tensors = load_file(path / "model.safetensors")
    save_file(edit(tensors), path / "model.safetensors", {"format": "pt"})


def test_hf_sharded_checkpoint_loads(tmp_path) -> None:
    hf = hf_model("mistral", num_key_value_heads=2, sliding_window=6)
    save_hf(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert max_diff(load_model(tmp_path)(ids), hf_logits(hf, ids)) <= TOL


def test_our_sharded_save_loads_in_ropo_and_hf(tmp_path) -> None:
    ours = our_model("llama", num_key_value_heads=2, tie_word_embeddings=True)
    save_model(ours, tmp_path, max_shard_bytes=30_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]  # the tied head is written once
    n_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    assert index["metadata"]["total_size"] == n_bytes
    assert not list(tmp_path.glob("*.tmp"))
    ids = random_ids(2, 16)
    with torch.no_grad():
        reference = ours(ids)
        # our_model builds llama.py's textbook modules: load the same ones to compare exactly
        assert max_diff(load_model(tmp_path, fast_kernels=False)(ids), reference) == 0
        assert max_diff(hf_logits(load_hf(tmp_path), ids), reference) <= TOL


def test_saved_weights_are_readable_by_others_as_the_umask_allows(tmp_path) -> None:
    # safetensors 0.8 creates its files 0600; a model in a shared $MODELS_DIR must not be.
    old = os.umask(0o022)
    try:
        save_model(our_model("llama"), tmp_path)
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == oct(0o644)


def test_resave_replaces_the_old_layout(tmp_path) -> None:
    ours = our_model()
    save_model(ours, tmp_path, max_shard_bytes=30_000)
    save_model(ours, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors"]


def test_missing_tensor_is_named(tmp_path) -> None:
    save_hf(hf_model(), tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    edit_single_file(tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=f"missing.*{name}"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path) -> None:
    save_hf(hf_model(), tmp_path)
    name = "model.layers.0.self_attn.q_proj.bias"
    edit_single_file(tmp_path, lambda t: t | {name: torch.zeros(64)})
    with pytest.raises(ValueError, match=f"unexpected.*{name}"):
        load_model(tmp_path)


def test_wrong_shape_is_named(tmp_path) -> None:
    save_hf(hf_model(), tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    edit_single_file(tmp_path, lambda t: t | {name: torch.zeros(32, 64)})
    with pytest.raises(ValueError, match=rf"wrong shape.*{name}.*\[32, 64\]"):
        load_model(tmp_path)


def test_vocab_mismatch_is_caught(tmp_path) -> None:
    # Pitfall 10: a config/vocab mismatch (32000 vs 32768) must not load silently.
    save_hf(hf_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"vocab_size": 200}))
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        load_model(tmp_path)


def test_legacy_rotary_inv_freq_is_ignored(tmp_path) -> None:
    hf = hf_model()
    save_hf(hf, tmp_path)
    legacy = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}
    edit_single_file(tmp_path, lambda t: t | legacy)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert max_diff(load_model(tmp_path)(ids), hf_logits(hf, ids)) <= TOL


def test_missing_shard_is_named(tmp_path) -> None:
    save_hf(hf_model(), tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(tmp_path)


def test_missing_files_say_what_is_expected(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json.*model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        load_model(tmp_path)


def test_tied_head_in_file_must_equal_embedding(tmp_path) -> None:
    hf = hf_model(tie_word_embeddings=True)
    save_hf(hf, tmp_path)
    edit_single_file(
        tmp_path, lambda t: t | {"lm_head.weight": t["model.embed_tokens.weight"].clone()}
    )
    model = load_model(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    edit_single_file(tmp_path, lambda t: t | {"lm_head.weight": t["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(tmp_path)


def test_bf16_checkpoint_stays_bf16_unless_asked(tmp_path) -> None:
    save_model(our_model().to(torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    as_fp32 = load_model(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.norm.weight, model.norm.weight.float())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("pretraining_tp", 2),
        ("architectures", ["Qwen2ForCausalLM"]),
        ("model_type", "gemma"),
        ("sliding_window", 4096),  # on a Llama config, where transformers would ignore it
    ],
)
def test_unsupported_config_field_is_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"my/config.json.*{field}"):
        ModelConfig.from_hf(TINY_HF | {field: value}, source="my/config.json")


def test_unsupported_config_is_refused_by_load_model(tmp_path) -> None:
    save_hf(hf_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    with pytest.raises(ValueError, match="config.json.*attention_bias"):
        load_model(tmp_path)


def test_config_reads_legacy_fields_and_head_dim() -> None:
    legacy = TINY_HF | {"rope_theta": 1e6, "eos_token_id": [2, 7]}
    legacy.pop("rope_parameters")
    legacy.pop("head_dim")
    config = ModelConfig.from_hf(legacy)
    assert (config.rope_theta, config.eos_token_id, config.head_dim) == (1e6, 2, 16)
    assert ModelConfig.from_hf(TINY_HF | {"head_dim": 32}).head_dim == 32


def write_safetensors(path, header: dict, data: bytes) -> None:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


DAMAGE = {  # model.safetensors bytes -> damaged bytes, and what the message says
    "truncated": (lambda raw: raw[:-100], "but its header describes"),
    "trailing_bytes": (lambda raw: raw + b"\0" * 8, "but its header describes"),
    "empty": (lambda raw: b"", "0 bytes, too short for the 8-byte header length"),
    "header_cut_short": (lambda raw: raw[:40], "the header length says"),
    "garbage": (lambda raw: b"\x07" * len(raw), "the header length says"),
    "header_not_json": (lambda raw: raw[:8] + b"{" * (len(raw) - 8), "header is not valid JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_safetensors_is_named(tmp_path, damage: str) -> None:
    save_hf(hf_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    edit, message = DAMAGE[damage]
    weights.write_bytes(edit(weights.read_bytes()))
    with pytest.raises(ValueError, match=rf"{weights}: damaged safetensors file.*{message}"):
        load_model(tmp_path)


def test_header_that_safetensors_refuses_is_named(tmp_path) -> None:
    save_hf(hf_model(), tmp_path)
    # The size matches the header, but 3 float32 values need 12 bytes, not 8.
    header = {"model.norm.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    write_safetensors(tmp_path / "model.safetensors", header, bytes(8))
    with pytest.raises(ValueError, match="model.safetensors: damaged safetensors file"):
        load_model(tmp_path)
    header["model.norm.weight"]["data_offsets"] = [8, "x"]
    write_safetensors(tmp_path / "model.safetensors", header, bytes(8))
    with pytest.raises(ValueError, match="tensor 'model.norm.weight' has no valid data_offsets"):
        check_safetensors(tmp_path / "model.safetensors")


def test_special_files_are_refused_unread(tmp_path) -> None:
    save_hf(hf_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=f"{weights}: is a character device, not a regular"):
        load_model(tmp_path)
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(ValueError, match=rf"{weights}: is a FIFO \(named pipe\)"):
        load_model(tmp_path)


CONFIG_KINDS = [  # (config.json edit, message)
    ({"hidden_size": "64"}, "field 'hidden_size' = '64' must be a positive integer"),
    ({"num_hidden_layers": 0}, "field 'num_hidden_layers' = 0 must be a positive integer"),
    ({"vocab_size": True}, "field 'vocab_size' = True must be a positive integer"),
    ({"rms_norm_eps": "1e-5"}, "field 'rms_norm_eps' = '1e-5' must be a number"),
    ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' = 'false' must be true or"),
    ({"eos_token_id": []}, "field 'eos_token_id' = [] must be an integer or a non-empty list"),
    ({"architectures": [{}]}, "field 'architectures' = [{}] must be a list of strings"),
    ({"rope_parameters": {"rope_theta": "big"}}, "field 'rope_parameters.rope_theta' = 'big'"),
]


@pytest.mark.parametrize(("edit", "message"), CONFIG_KINDS)
def test_config_field_of_the_wrong_type_is_named(edit: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"my/config.json: {message}")):
        ModelConfig.from_hf(TINY_HF | edit, source="my/config.json")


def test_config_json_must_be_an_object_of_valid_json(tmp_path) -> None:
    save_hf(hf_model(), tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps([TINY_HF]))
    with pytest.raises(ValueError, match=f"{config_file}: expected a JSON object .* got list"):
        read_model_config(tmp_path)
    config_file.write_text('{\n  "vocab_size": 160\n  "hidden_size": 64\n}\n')
    with pytest.raises(ValueError, match=f"{config_file}:3: not valid JSON: Expecting ','"):
        load_model(tmp_path)


def test_index_needs_a_weight_map(tmp_path) -> None:
    save_hf(hf_model(), tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    for content in ('{"metadata": {}}', '{"weight_map": ["a"]}', "[]"):
        index.write_text(content)
        with pytest.raises(ValueError, match=f"{index}: field 'weight_map' is missing or not"):
            load_model(tmp_path)
    index.write_text('{"weight_map": {\n}}}')
    with pytest.raises(ValueError, match=f"{index}:2: not valid JSON"):
        load_model(tmp_path)
