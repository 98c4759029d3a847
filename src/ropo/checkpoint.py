"""Checkpoints that survive crashes: model in HF layout plus everything needed to resume exactly.

A checkpoint directory holds the policy (`save_model`: config.json + safetensors, in the training
dtype, beside the tokenizer files of models/export.py), the AdamW state
(`optimizer.safetensors`), the loop counters and run state (`state.json`), and a `manifest.json`
with the sha256 of every file. It is written under a temporary name, fsynced and renamed; the
`LATEST` pointer is replaced last. A directory without a manifest, or whose files do not match
it, is never loaded as if complete: a resume falls back to the newest checkpoint that verifies.
The manifest also names the run that wrote it (run id and resolved config, from `state`), so a
resume can refuse a checkpoint of another run found in its directory.

With LoRA the policy part is only `lora.safetensors` (the adapters, our names): the frozen base
stays in the model directory, and state.json records its sha256 so a resume can check it. Under
torchrun every rank calls save_checkpoint and the whole tensors are gathered to rank 0, which
writes the same files one process would: any number of processes can resume from them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ropo.distributed import (
    barrier,
    gather_optimizer_state,
    gather_weights,
    is_main,
    load_optimizer_state,
    world_size,
)
from ropo.fingerprints import file_sha256
from ropo.models.export import TokenizerExport, write_tokenizer_files
from ropo.models.files import save_safetensors, write_atomic
from ropo.models.llama import Transformer
from ropo.models.load import save_weights
from ropo.models.lora import has_lora

MANIFEST = "manifest.json"
LORA_FILE = "lora.safetensors"


def save_checkpoint(
    run_dir: Path,
    name: str,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int = 2,
    tokenizer: TokenizerExport | None = None,
) -> Path:
    """Write checkpoint `name` under run_dir/checkpoints atomically and point LATEST at it.

    With `tokenizer`, a full checkpoint's model files also get the tokenizer files that
    Hugging Face tools read (models/export.py); a LoRA checkpoint holds only adapters.
    Under torchrun every rank must call this; rank 0 writes, and all return once it is on disk.
    """
    lora = has_lora(model)
    weights = gather_weights(model, trainable_only=lora)  # collective under FSDP
    optimizer_state = gather_optimizer_state(model, optimizer)
    root = run_dir / "checkpoints"
    if is_main():
        _write_checkpoint(
            root, name, model, weights, optimizer_state, state, lora, keep_last, tokenizer
        )
    barrier()
    return root / name


def _write_checkpoint(
    root: Path,
    name: str,
    model: Transformer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    lora: bool,
    keep_last: int,
    tokenizer: TokenizerExport | None,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    for stale in root.glob(".tmp-*"):  # left by a killed run; for a 7B model tens of GB
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    if lora:
        save_safetensors({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / LORA_FILE)
    else:
        save_weights(model.config, weights, tmp)
        if tokenizer is not None:
            write_tokenizer_files(tmp, tokenizer, model.config.max_position_embeddings)
    tensors, groups = _flatten_optimizer(optimizer_state)
    save_safetensors(tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_safetensors(rng, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))
    write_manifest(tmp, state)
    _fsync_dir_files(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the whole directory at once; the manifest inside vouches for it
    write_atomic(root / "LATEST", name, sync=True)
    _prune(root, keep=keep_last, current=name)


def write_manifest(directory: Path, state: dict[str, Any]) -> None:
    """The manifest of a checkpoint being written: the sha256 of every file already in
    `directory`, and the run that wrote it (`state`'s run id and config). Written after every
    other file, it is what makes the checkpoint complete (verify_checkpoint)."""
    files = sorted(p.name for p in directory.iterdir())
    manifest = {
        "run_id": state.get("run_id"),
        "config": state.get("config"),
        "files": {name: file_sha256(directory / name) for name in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are incomplete or do not match its manifest."""


def latest_checkpoint(run_dir: Path, run_id: str | None = None) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies; None when there is none at all.

    LATEST is tried first, then the other checkpoints, newest first: a damaged one is passed
    over (and said so on the console), since older good checkpoints are kept for that. With
    `run_id`, a checkpoint written by another run raises ValueError naming both runs.
    """
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / "LATEST"
    newest = [root / pointer.read_text().strip()] if pointer.is_file() else []
    others = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    damaged = []
    for path in dict.fromkeys(newest + others):  # in order, each once
        try:
            verify_checkpoint(path, run_id)
        except DamagedCheckpoint as err:
            damaged.append(str(err))
            continue
        if damaged and is_main():
            print(f"resume: {'; '.join(damaged)}; using {path}, the newest one that verifies")
        return path
    if damaged:
        raise DamagedCheckpoint(f"no checkpoint in {root} verifies: {'; '.join(damaged)}")
    return None


def verify_checkpoint(path: Path, run_id: str | None = None) -> None:
    """Raise DamagedCheckpoint unless every file listed in the manifest exists with its checksum;
    with `run_id`, ValueError when another run (or a ropo without run ids) wrote it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DamagedCheckpoint(
            f"checkpoint {path} has no {MANIFEST}: it was not written completely"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:  # also UnicodeDecodeError
        manifest = None
    files = manifest.get("files", manifest) if isinstance(manifest, dict) else None
    if not isinstance(files, dict):  # a manifest before run ids is the flat files dict
        raise DamagedCheckpoint(
            f"checkpoint {path}: {MANIFEST} is unreadable; the checkpoint is damaged"
        )
    if run_id is not None and manifest.get("run_id") != run_id:
        writer = manifest.get("run_id") or "unknown (a ropo without run ids)"
        raise ValueError(
            f"checkpoint {path} was written by run {writer}, but "
            f"{path.parent.parent / 'run.json'} is run {run_id}: this directory mixes two runs "
            f"(a copied or reused run directory?). Resume refused; start a new run in an empty "
            f"directory, or with overwrite=true"
        )
    for name, digest in files.items():
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            raise DamagedCheckpoint(
                f"checkpoint {path}: {name} is missing or does not match its "
                f"checksum; the checkpoint is damaged"
            )


def load_checkpoint(
    path: Path,
    load_policy: Callable[[Path], Transformer],
    optimizer_for: Callable[[Transformer], torch.optim.Optimizer],
    device: str | torch.device,
) -> tuple[Transformer, torch.optim.Optimizer, dict[str, Any]]:
    """Model (`load_policy(path)`: from the HF files, or base + `load_adapters`), optimizer
    (built by `optimizer_for(model)`, then restored) and state of `path`."""
    verify_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    for field in ("loop", "param_groups"):
        if field not in state:
            raise ValueError(f"{path / 'state.json'}: field '{field}' is missing")
    model = load_policy(path)
    optimizer = optimizer_for(model)
    groups, saved = state.pop("param_groups"), {}
    if is_main():  # under FSDP rank 0 reads the whole state on the CPU and sends out the shards
        where = str(device) if world_size() == 1 else "cpu"
        tensors = load_file(str(path / "optimizer.safetensors"), device=where)
        saved = _unflatten_optimizer(tensors, groups)
    load_optimizer_state(model, optimizer, saved)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return model, optimizer, state


def load_adapters(model: Transformer, path: Path, base_sha256: str) -> None:
    """Copy the LoRA adapters of checkpoint `path` into `model`, which must already carry
    adapters of the same shapes on the base model whose fingerprint is `base_sha256`."""
    saved = json.loads((path / "state.json").read_text()).get("base_model_sha256")
    if saved != base_sha256:
        raise ValueError(
            f"checkpoint {path} trained LoRA adapters on a base model with sha256 {saved}, but "
            f"the model directory now has {base_sha256}: resume needs the same base weights"
        )
    adapters = load_file(str(path / LORA_FILE))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(adapters) != expected:
        raise ValueError(
            f"checkpoint {path}/{LORA_FILE} holds {sorted(set(adapters) ^ expected)[:5]}, which "
            f"the model's adapters do not match (other lora_rank or lora_targets?)"
        )
    model.load_state_dict(adapters, strict=False)


def _flatten_optimizer(full: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, per_param in full["state"].items():
        for key, value in per_param.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
    return tensors, full["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for flat_key, value in tensors.items():
        index, key = flat_key.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int, current: str) -> None:
    done = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    for old in done[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
