"""Checkpoint directory <-> Transformer: config.json plus safetensors in the Hugging Face layout.

Everything downstream (log-probs, training, sampling) gets its network from load_model; training
writes it back with save_model. The only module that knows Hugging Face tensor names.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ropo.models.config import ModelConfig, read_model_config
from ropo.models.files import check_safetensors, read_json, save_safetensors, write_atomic
from ropo.models.kernels import use_fast_kernels
from ropo.models.llama import Transformer

# Hugging Face name -> our name; {i} is the layer index. Loading is only this renaming, because
# our RoPE uses the same half-split layout the HF q/k weights were permuted for.
HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
OURS_TO_HF = {ours: hf for hf, ours in HF_TO_OURS.items()}
# Old checkpoints saved RoPE's inverse frequencies; we recompute them from rope_theta.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
LAYER = re.compile(r"((?:model\.)?layers)\.(\d+)\.")
EXPECTED_FILES = (
    "config.json plus model.safetensors, or model.safetensors.index.json and the "
    "model-0000i-of-0000n.safetensors shards it lists"
)
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def rename(name: str, table: dict[str, str], layer: re.Pattern[str] = LAYER) -> str | None:
    """Map a tensor name through `table`, whose keys use {i} for the layer index; None if absent.
    `layer` finds the layer index in a name (gguf.py passes llama.cpp's `blk.N.`)."""
    match = layer.match(name)
    if match is None:
        return table.get(name)
    template = table.get(layer.sub(r"\1.{i}.", name, count=1))
    return None if template is None else template.format(i=match.group(2))


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    fast_kernels: bool = True,
) -> Transformer:
    """The Transformer in `path`, in eval mode, in the checkpoint dtype unless `dtype` is given,
    with the faster modules of models/kernels.py swapped in (`fast_kernels=False`: llama.py's).

    Loading is strict: missing, unexpected or misshapen tensors raise ValueError naming them, and
    so do damaged files.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}; expected {EXPECTED_FILES}")
    config = read_model_config(path)
    files = _weight_files(path)  # HF name -> file holding it
    with torch.device("meta"):  # shapes only: no memory and no wasted random init
        model = Transformer(config)
    shapes, dtypes = _read_headers(files)
    _check_names_and_shapes(model, files, shapes, path)
    dtype = dtype or dtypes["model.embed_tokens.weight"]
    model = model.to(dtype).to_empty(device=device or "cpu")
    if config.tie_word_embeddings:  # to_empty gives each module its own new Parameter
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    tied_head_file = None
    for file in sorted(set(files.values())):
        with _open_safetensors(file) as f, torch.no_grad():
            for name in f.keys():
                ours = rename(name, HF_TO_OURS) if files.get(name) == file else None
                if ours == "output.weight" and config.tie_word_embeddings:
                    tied_head_file = file
                elif ours is not None:
                    params[ours].copy_(f.get_tensor(name))  # one tensor at a time
    if tied_head_file is not None:
        _check_tied_head(model, tied_head_file)
    if fast_kernels:
        use_fast_kernels(model)
    return model.eval()


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype of the weights in checkpoint `path` (its embedding's, which load_model keeps by
    default), read from the safetensors headers alone."""
    _, dtypes = _read_headers(_weight_files(Path(path)))
    return dtypes["model.embed_tokens.weight"]


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it; every file is checked before it is opened."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if not index.exists():
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {path}; "
            f"expected {EXPECTED_FILES}"
        )
    files = {name: path / shard for name, shard in _read_weight_map(index).items()}
    missing = sorted({file.name for file in files.values() if not file.exists()})
    if missing:
        raise FileNotFoundError(f"{index} lists shard files missing from {path}: {missing}")
    return files


def _read_weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json(index, missing=f"{index} does not exist")
    if isinstance(weight_map, dict):
        weight_map = weight_map.get("weight_map")
    valid = isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())
    if not valid:
        raise ValueError(
            f"{index}: field 'weight_map' is missing or not an object of tensor name -> shard "
            "file, as save_pretrained writes it; save or download the checkpoint again"
        )
    return weight_map


def _open_safetensors(file: Path) -> safe_open:
    """safe_open on a file whose size matched its header; any other damage names the file."""
    check_safetensors(file)
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(
            f"{file}: damaged safetensors file ({err}); download or save it again"
        ) from None


def _read_headers(files: dict[str, Path]) -> tuple[dict[str, list[int]], dict[str, torch.dtype]]:
    shapes, dtypes = {}, {}
    for file in sorted(set(files.values())):
        with _open_safetensors(file) as f:
            for name in f.keys():
                if files.get(name) == file:  # an index may point elsewhere; trust the index
                    tensor = f.get_slice(name)
                    shapes[name] = tensor.get_shape()
                    dtypes[name] = SAFETENSORS_DTYPES.get(tensor.get_dtype(), torch.float32)
    return shapes, dtypes


def _check_names_and_shapes(
    model: Transformer, files: dict[str, Path], shapes: dict[str, list[int]], path: Path
) -> None:
    expected = {name: list(p.shape) for name, p in model.named_parameters()}  # tied head once
    tied = model.config.tie_word_embeddings
    found, missing, unexpected, wrong = set(), [], [], []
    for name, file in files.items():
        ours = rename(name, HF_TO_OURS)
        if IGNORED.fullmatch(name) or (tied and ours == "output.weight"):
            continue
        if name not in shapes:
            missing.append(f"{name} (the index points to {file.name}, which lacks it)")
        elif ours not in expected:
            unexpected.append(f"{name} ({file.name})")
        elif shapes[name] != expected[ours]:
            wrong.append(f"{name} in {file.name}: {shapes[name]}, expected {expected[ours]}")
        found.add(ours)
    missing += [rename(ours, OURS_TO_HF) or ours for ours in sorted(set(expected) - found)]
    if missing or unexpected or wrong:
        problems = tensor_mismatch(missing, unexpected, wrong)
        raise ValueError(f"checkpoint {path} does not match its config.json; {problems}")


def tensor_mismatch(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """ "missing: a, b; unexpected: c; wrong shape: d": the tensors of a file that do not fit the
    network its config describes, each kind listed only when there are some."""
    kinds = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
    return "; ".join(f"{label}: {', '.join(names)}" for label, names in kinds if names)


def _check_tied_head(model: Transformer, file: Path) -> None:
    # A tied checkpoint may still carry lm_head.weight; accept it only if it is the embedding.
    with _open_safetensors(file) as f:
        head = f.get_tensor("lm_head.weight")
    embedding = model.tok_embeddings.weight
    if not torch.equal(head.to(embedding.dtype), embedding.detach().cpu()):
        raise ValueError(
            f"{file}: lm_head.weight differs from model.embed_tokens.weight, but config.json "
            "sets tie_word_embeddings=true"
        )


def save_model(model: Transformer, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and HF-named safetensors (sharded with an index above max_shard_bytes).

    Each file goes to a temporary name first and config.json lands last, so an interrupted save
    never looks like a complete checkpoint.
    """
    # named_parameters lists a tied head once, as the embedding
    weights = {name: p.detach() for name, p in model.named_parameters()}
    save_weights(model.config, weights, path, max_shard_bytes)


def save_weights(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    path: str | Path,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """`save_model` for a state dict in our names, e.g. one gathered from FSDP-sharded processes.

    A name with no Hugging Face counterpart (a LoRA adapter not merged yet) raises ValueError.
    """
    path = Path(path)
    unknown = [name for name in weights if rename(name, OURS_TO_HF) is None]
    if unknown:
        raise ValueError(f"no Hugging Face name for {unknown[:5]}; merge LoRA adapters first")
    tied = config.tie_word_embeddings  # a gathered state dict may list the tied head twice
    tensors = {
        rename(name, OURS_TO_HF): tensor
        for name, tensor in weights.items()
        if not (tied and name == "output.weight")
    }
    path.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    filenames = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    (path / "config.json").unlink(missing_ok=True)
    _remove_stale_weights(path, keep=set(filenames))
    weight_map = {}
    for filename, names in zip(filenames, shards, strict=True):
        shard = {name: tensors[name].to("cpu").contiguous() for name in names}
        write_atomic(
            path / filename, lambda tmp, s=shard: save_safetensors(s, tmp, {"format": "pt"})
        )
        weight_map.update(dict.fromkeys(names, filename))
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(path / "model.safetensors.index.json", index)
    dtype = str(weights["tok_embeddings.weight"].dtype).removeprefix("torch.")
    # transformers 4.x reads torch_dtype, 5.x reads dtype.
    _write_json(path / "config.json", config.to_hf() | {"torch_dtype": dtype, "dtype": dtype})


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    # Greedy in name order; a tensor larger than the limit gets a shard of its own.
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _remove_stale_weights(path: Path, keep: set[str]) -> None:
    # Leftovers of an earlier save in the other layout would make the directory ambiguous.
    stale = [*path.glob("model-*-of-*.safetensors"), path / "model.safetensors.index.json"]
    stale.append(path / "model.safetensors")
    for file in stale:
        if file.name not in keep:
            file.unlink(missing_ok=True)


def _write_json(target: Path, data: dict) -> None:
    write_atomic(target, json.dumps(data, indent=2) + "\n")
