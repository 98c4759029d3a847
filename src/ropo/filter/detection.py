"""How well the w-step finds flipped pairs, for runs whose label noise was injected on purpose.

Stage: filter → sampling → **audit**. In: pair ids, per-pair scores (loss or margin) and the
ground-truth flip mask kept by the noise injector. Out: plain floats for the audit log.
"""

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


def drop_precision_recall(
    dropped_ids: Iterable[str], flipped: Mapping[str, bool]
) -> tuple[float, float]:
    """(precision, recall) of the dropped set as a detector of flipped pairs.

    precision = |dropped ∩ flipped| / |dropped|, recall = |dropped ∩ flipped| / |flipped|, where
    `flipped` maps every scored pair id to its flip flag. A 0/0 (nothing dropped, or no flips at
    all) is nan: the quantity is undefined, and 0 or 1 would bias averages over rounds.
    """
    dropped = list(dropped_ids)
    if len(set(dropped)) != len(dropped):
        raise ValueError("dropped_ids contains repeated ids")
    unknown = [pid for pid in dropped if pid not in flipped]
    if unknown:
        raise ValueError(
            f"{len(unknown)} dropped id(s) missing from `flipped`, e.g. {unknown[:10]}"
        )
    hits = sum(bool(flipped[pid]) for pid in dropped)
    n_flipped = sum(bool(flag) for flag in flipped.values())
    precision = hits / len(dropped) if dropped else math.nan
    recall = hits / n_flipped if n_flipped else math.nan
    return precision, recall


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """AUROC: chance that a random positive outscores a random negative, ties counting 1/2.

    Mann–Whitney U with average ranks, (R₊ − n₊(n₊+1)/2) / (n₊·n₋), in O(N log N); nan when either
    class is empty. For the loss as a flip detector: scores = per-pair losses, labels = flip flags.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"scores and labels must be 1-D of one length, got {s.shape} and {y.shape}"
        )
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))
        raise ValueError(f"scores must be finite; non-finite at positions {bad[:10].tolist()}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # A run of c tied scores ending at rank e (1-based) spans ranks e−c+1..e; each gets their mean.
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def reward_accuracy(margins: Tensor | Sequence[float]) -> float:
    """Share of margins strictly above 0; a tie (margin 0, as at step 0) counts as wrong.

    nan for no margins. A nan margin counts as wrong, so a broken step shows up as low accuracy
    rather than crashing the logger.
    """
    m = torch.as_tensor(margins).detach()
    if m.numel() == 0:
        return math.nan
    return (m > 0).double().mean().item()
