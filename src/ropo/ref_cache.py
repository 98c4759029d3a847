"""Reference log-probs: the frozen reference scores every pair once, and the loop only reads them.

Sits between the log-probs and the loss: `reference_logps` scores the pairs with the reference
model (the policy's starting point unless `reference=` names another model directory), frees the
model again and keeps the numbers keyed by pair id in `RefLogps`. They are cached on disk under a
fingerprint of everything that changes them, so a rerun or a resume reads them back instead of
scoring again; ref_cache_files.py holds that bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ropo.data import TokenizedPair
from ropo.logps import PairLogps
from ropo.logps_fused import score_pairs
from ropo.models.load import load_model
from ropo.ref_cache_files import cache_location, read_cache, write_cache


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
            return RefLogps(ids, cached, fingerprint)
    reference = load_model(model_dir, dtype=dtype, device=device)
    logps = score_pairs(reference, pairs, batch_size, pad_id, desc="reference log-probs")
    del reference
    write_cache(path, fingerprint, ids, logps)
    return RefLogps(ids, logps, fingerprint)
