"""The w-step: with the policy fixed, choose which pairs the next round trains on.

Stage: loss → **filter** → sampling → audit. In: one margin per pair over the whole data set
(gathered from every rank), keyed by pair id. Out: a DropDecision holding 0/1 weights that sum
to n_keep.
"""

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor


# eq=False: `==` on a tensor field is ambiguous, so decisions compare by identity.
@dataclass(frozen=True, eq=False)
class DropDecision:
    """Which pairs the w-step keeps: `weights` (N,) float32, detached, on CPU, 1 = keep, 0 = drop.

    The weights sum to n_keep = keep_count(N, rho), not to 1 and not to N.
    """

    ids: tuple[str, ...]  # every scored pair id, in input order
    weights: Tensor  # (N,), aligned with ids
    n_keep: int

    def __post_init__(self) -> None:
        # A decision may also be rebuilt from a saved round, so check what the docstring promises.
        w = self.weights
        if w.shape != (len(self.ids),) or not ((w == 0) | (w == 1)).all():
            raise ValueError(f"weights must be 0/1 of shape ({len(self.ids)},), got {w.shape}")
        if w.sum().item() != self.n_keep:
            raise ValueError(f"weights sum to {w.sum().item()}, but n_keep is {self.n_keep}")

    @property
    def kept_ids(self) -> tuple[str, ...]:
        """Ids with weight 1, in input order."""
        return tuple(pid for pid, w in zip(self.ids, self.weights.tolist(), strict=True) if w)

    @property
    def dropped_ids(self) -> tuple[str, ...]:
        """Ids with weight 0, in input order."""
        return tuple(pid for pid, w in zip(self.ids, self.weights.tolist(), strict=True) if not w)


def keep_count(n_pairs: int, rho: float) -> int:
    """(1 − ρ)·N rounded half up, floor((1 − ρ)·N + 1/2), computed exactly on ρ as written.

    Python's round() rounds halves to even (round(2.5) == 2), and in floats (1 − 0.3)·45 is
    31.4999…, not 31.5; reading ρ through its decimal string makes 0.3 exactly 3/10. ρ, the share
    of pairs dropped, is the `rho` key (checked when the config is read) or rho=auto's estimate.
    """
    assert 0 <= rho < 1, f"rho must be in [0, 1), got {rho!r}"
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    keep_share = 1 - Fraction(str(float(rho)))
    return math.floor(keep_share * n_pairs + Fraction(1, 2))


@torch.no_grad()
def select_drops(ids: Sequence[str], margins: Tensor, rho: float) -> DropDecision:
    """Keep the keep_count(N, ρ) pairs with the highest margin Δ; `margins` (N,) aligns with `ids`.

    The paper keeps the lowest-loss pairs: min_w Σ w_i·ℓ_i s.t. Σ w_i = (1 − ρ)·N, 0 ≤ w_i ≤ 1, a
    linear program whose optimum is 0/1 (docs/method.md §3; the problem is the paper's, v2
    abstract). For ROPO and DPO the loss is strictly decreasing in Δ, so ranking by Δ keeps
    exactly those pairs. It also stays right for
    the losses that are not monotone in Δ: IPO's (Δ − 1/(2β))² and cDPO's (once t > ln((1−ε)/ε))
    grow again for confidently correct pairs, and ranking by them would drop those first. Ties go by
    Δ, then by id, so every rank reaches the same decision whatever the input order. The returned
    weights sum to n_keep (not 1, not N).
    """
    ids = tuple(ids)
    margins = torch.as_tensor(margins)
    if margins.dim() != 1 or margins.numel() != len(ids):
        raise ValueError(
            f"margins must have shape ({len(ids)},), one per id; got {tuple(margins.shape)}"
        )
    if len(set(ids)) != len(ids):
        repeated = sorted(pid for pid, count in Counter(ids).items() if count > 1)
        raise ValueError(f"pair ids must be unique; repeated: {repeated[:10]}")
    # float64 on CPU holds every float32/bf16 value exactly, so the order is the tensor's order.
    values = margins.detach().to("cpu", torch.float64).tolist()
    non_finite = [pid for pid, value in zip(ids, values, strict=True) if not math.isfinite(value)]
    if non_finite:
        raise ValueError(f"non-finite margin for {len(non_finite)} pair(s), e.g. {non_finite[:10]}")

    n_keep = keep_count(len(ids), rho)
    order = sorted(range(len(ids)), key=lambda i: (-values[i], ids[i]))
    weights = torch.zeros(len(ids), dtype=torch.float32)
    weights[torch.tensor(order[:n_keep], dtype=torch.long)] = 1.0
    return DropDecision(ids=ids, weights=weights, n_keep=n_keep)
