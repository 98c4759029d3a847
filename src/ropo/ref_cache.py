"""Reference log-probs, computed once per dataset and cached on disk.

The frozen reference model scores every pair once; the training loop only reads the cache. The
cache file name is a fingerprint of everything that changes the numbers: the reference weights
and config, the exact token ids of every pair (which already captures the tokenizer, the chat
template and the truncation rule), the dtype and the log-prob convention. A changed input gives a
different fingerprint and therefore a recomputation, never a stale cache.

The reference is the policy's starting point unless `reference=` names another model directory;
`check_reference_model` makes sure that one can score the policy's token ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ropo.data import TokenizedPair
from ropo.logps import PairLogps
from ropo.logps_fused import score_pairs
from ropo.models.config import read_model_config
from ropo.models.files import (
    check_safetensors,
    require_regular_file,
    save_safetensors,
    write_atomic,
)
from ropo.models.load import load_model

# Bump when the way log-probs are computed changes, so old caches stop matching. v2: one
# [prompt | chosen | rejected] row per pair (logps_fused.collate_pairs) instead of two rows; the
# sums agree only up to float rounding, so v1 caches (the two-row layout) are not reused.
LOGP_CONVENTION = "shared-prompt-row-summed-response-logps-fp32-v2"


@dataclass
class RefLogps:
    """Reference log-probs keyed by pair id."""

    ids: list[str]
    logps: PairLogps
    fingerprint: str

    def __post_init__(self) -> None:
        self._row = {pair_id: i for i, pair_id in enumerate(self.ids)}

    def lookup(self, ids: Sequence[str]) -> PairLogps:
        """PairLogps (B,) for `ids`, in that order."""
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise KeyError(f"no reference log-probs for pair ids {missing[:5]}")
        index = torch.tensor([self._row[i] for i in ids], dtype=torch.long)
        return PairLogps(
            self.logps.chosen[index],
            self.logps.rejected[index],
            self.logps.chosen_tokens[index],
            self.logps.rejected_tokens[index],
        )

    def extend(self, other: RefLogps) -> RefLogps:
        """This cache plus the pairs of `other` (new ids only), e.g. rejection-sampled pairs."""
        new = [i for i, pair_id in enumerate(other.ids) if pair_id not in self._row]
        index = torch.tensor(new, dtype=torch.long)
        cat = lambda a, b: torch.cat([a, b[index]])  # noqa: E731
        mine, theirs = self.logps, other.logps
        merged = PairLogps(
            cat(mine.chosen, theirs.chosen),
            cat(mine.rejected, theirs.rejected),
            cat(mine.chosen_tokens, theirs.chosen_tokens),
            cat(mine.rejected_tokens, theirs.rejected_tokens),
        )
        return RefLogps(self.ids + [other.ids[i] for i in new], merged, self.fingerprint)


def fingerprint_pairs(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 over the ids and token ids of every pair, in order."""
    return fingerprint_rows([p.id, p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs)


def fingerprint_rows(rows: Iterable[list]) -> str:
    """sha256 over the JSON of every row (ids and token ids of a pair or an SFT example)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, separators=(",", ":")).encode())
    return digest.hexdigest()


def fingerprint_model_dir(model_dir: str | Path) -> str:
    """sha256 over config.json and every safetensors file of a checkpoint directory.

    Reading every byte is deliberate: a size/mtime shortcut would miss a checkpoint rewritten in
    place. For a 7B checkpoint this costs about a minute once per run, against hours of training.
    """
    model_dir = Path(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    for path in weights:  # a FIFO or /dev/zero would hang the hash; a damaged file gets named
        check_safetensors(path)
    require_regular_file(model_dir / "config.json", f"no config.json in {model_dir}")
    files = weights + [model_dir / "config.json"]
    # Within a process, files that keep their inode, size and mtime are hashed once (a LoRA run
    # asks twice: cache key, base check); one written since, e.g. by an earlier stage of the
    # built-in task, is read again.
    return _files_digest(tuple((p, *_identity(p.stat())) for p in files))


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.cache
def _files_digest(files: tuple[tuple[Path, int, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, *_ in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def check_reference_model(model_dir: Path, reference_dir: Path) -> None:
    """ValueError unless the reference in `reference_dir` can score the policy's token ids: its
    config.json describes the policy's network (architecture, sizes, vocabulary) and any
    tokenizer file both directories have is the same file. Errors name both directories."""
    ours, theirs = read_model_config(model_dir).to_hf(), read_model_config(reference_dir).to_hf()
    differing = [key for key in ours if ours[key] != theirs.get(key)]
    if differing:
        shown = "; ".join(
            f"{key} = {theirs.get(key)!r} there, {ours[key]!r} in the policy's"
            for key in differing[:3]
        )
        raise ValueError(
            f"config key 'reference': {reference_dir}/config.json is not the network of the "
            f"policy ({model_dir}/config.json): {shown}; the reference must have the policy's "
            "architecture and vocabulary"
        )
    for name in ("tokenizer.model", "tokenizer.json"):
        policy_file, reference_file = model_dir / name, reference_dir / name
        both = policy_file.is_file() and reference_file.is_file()
        if both and file_sha256(policy_file) != file_sha256(reference_file):
            raise ValueError(
                f"config key 'reference': {reference_file} differs from the policy's "
                f"{policy_file}: the reference scores the policy's token ids, so it needs the "
                "same tokenizer"
            )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def reference_logps(
    model_dir: str | Path,
    pairs: Sequence[TokenizedPair],
    cache_dir: str | Path,
    batch_size: int,
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> RefLogps:
    """Reference log-probs of `pairs`, read from `cache_dir` when a matching file exists.

    Otherwise the reference model is loaded from `model_dir`, scores every pair once in eval mode,
    and is freed again; the result is written atomically so a crash never leaves half a cache.
    """
    path, fingerprint = cache_location(model_dir, pairs, cache_dir, dtype, device)
    ids = [pair.id for pair in pairs]
    if path.is_file():
        cached = read_cache(path, fingerprint, ids)
        if cached is not None:
            return cached
    reference = load_model(model_dir, dtype=dtype, device=device)
    logps = score_pairs(reference, pairs, batch_size, pad_id, desc="reference log-probs")
    del reference
    write_cache(path, fingerprint, ids, logps)
    return RefLogps(ids, logps, fingerprint)


def cache_location(
    model_dir: str | Path,
    pairs: Sequence[TokenizedPair],
    cache_dir: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
) -> tuple[Path, str]:
    """The cache file for these reference log-probs and its full fingerprint.

    Reads the autocast state of the caller: log-probs under bf16 autocast are other numbers.
    """
    autocast = (
        torch.get_autocast_dtype(torch.device(device).type)
        if torch.is_autocast_enabled(torch.device(device).type)
        else None
    )
    key_parts = [
        fingerprint_model_dir(model_dir),
        fingerprint_pairs(pairs),
        str(dtype),
        f"autocast={autocast}",
        LOGP_CONVENTION,
    ]
    fingerprint = hashlib.sha256("|".join(key_parts).encode()).hexdigest()
    return Path(cache_dir) / f"ref-logps-{fingerprint[:24]}.safetensors", fingerprint


def read_cache(path: Path, fingerprint: str, ids: list[str]) -> RefLogps | None:
    """The log-probs cached at `path` if it holds this fingerprint and these ids, else None."""
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint or meta.get("ids") != ids:
        return None
    logps = PairLogps(
        tensors["chosen"], tensors["rejected"], tensors["chosen_tokens"], tensors["rejected_tokens"]
    )
    return RefLogps(ids, logps, fingerprint)


def write_cache(path: Path, fingerprint: str, ids: list[str], logps: PairLogps) -> None:
    """Write the log-probs of `ids` to `path`: tensors first, the json vouching for them last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "chosen": logps.chosen.contiguous(),
        "rejected": logps.rejected.contiguous(),
        "chosen_tokens": logps.chosen_tokens.contiguous(),
        "rejected_tokens": logps.rejected_tokens.contiguous(),
    }
    meta = {"fingerprint": fingerprint, "ids": ids, "convention": LOGP_CONVENTION}
    # The json is written last: a cache counts only when both files exist and agree.
    write_atomic(path, lambda tmp: save_safetensors(tensors, tmp))
    write_atomic(path.with_suffix(".json"), json.dumps(meta))
