"""The reference cache on disk: which file holds which log-probs, and how it is read and written.

Bookkeeping behind ref_cache.py, which a reader of the method can skip. The cache file name is a
fingerprint of everything that changes the numbers: the reference weights and config, the exact
token ids of every pair (which already captures the tokenizer, the chat template and the
truncation rule), the dtype, the autocast state and the log-prob convention. A changed input
gives a different fingerprint and therefore a recomputation, never a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from ropo.data import TokenizedPair
from ropo.fingerprints import fingerprint_model_dir, fingerprint_pairs
from ropo.logps import PairLogps
from ropo.models.files import save_safetensors, write_atomic

# Bump when the way log-probs are computed changes, so old caches stop matching. v2: one
# [prompt | chosen | rejected] row per pair (logps_fused.collate_pairs) instead of two rows; the
# sums agree only up to float rounding, so v1 caches (the two-row layout) are not reused.
LOGP_CONVENTION = "shared-prompt-row-summed-response-logps-fp32-v2"


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


def read_cache(path: Path, fingerprint: str, ids: list[str]) -> PairLogps | None:
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
    return PairLogps(
        tensors["chosen"], tensors["rejected"], tensors["chosen_tokens"], tensors["rejected_tokens"]
    )


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
