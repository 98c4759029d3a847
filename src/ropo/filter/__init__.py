"""The w-step and its audit: which pairs to keep, and how well the drops match injected flips.

Public interface:
    select_drops(ids, margins, rho) -> DropDecision (0/1 weights summing to n_keep)
    keep_count(n_pairs, rho)        -> round-half-up (1 − ρ)·N
    estimate_flip_rate(margins)     -> the share of flipped pairs, for rho=auto
    drop_precision_recall, auroc, reward_accuracy -> floats for the audit log
"""

from ropo.filter.detection import auroc, drop_precision_recall, reward_accuracy
from ropo.filter.noise_rate import estimate_flip_rate
from ropo.filter.weights import DropDecision, keep_count, select_drops

__all__ = [
    "DropDecision",
    "auroc",
    "drop_precision_recall",
    "estimate_flip_rate",
    "keep_count",
    "reward_accuracy",
    "select_drops",
]
