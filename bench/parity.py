"""The comparisons behind the benchmark's correctness guard (guard.py): pure functions of tensors.

Kept free of TRL and of the other bench modules, so that tests/test_bench_parity.py can load this
file on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ropo.models.load import OURS_TO_HF, rename

# Summed log-probs are ~ -530 here; fp32 resolves them to ~6e-5, so their check is relative.
LOGP_RTOL, LOSS_TOL, NORM_RTOL, WEIGHT_RTOL = 1e-5, 1e-5, 1e-4, 1e-3


@dataclass
class Check:
    name: str
    max_abs: float
    max_rel: float
    limit: str
    ok: bool


def compare(name: str, ours: Any, theirs: Any, atol: float = 0.0, rtol: float = 0.0) -> Check:
    """ok when |ours - theirs| <= atol + rtol * |theirs| element-wise (tensors or floats)."""
    ours = torch.as_tensor(ours, dtype=torch.float64).flatten()
    theirs = torch.as_tensor(theirs, dtype=torch.float64).flatten()
    if ours.shape != theirs.shape:
        return Check(name, float("inf"), float("inf"), "shapes differ", False)
    diff = (ours - theirs).abs()
    rel = diff / theirs.abs().clamp_min(1e-30)
    ok = bool((diff <= atol + rtol * theirs.abs()).all()) and bool(torch.isfinite(ours).all())
    limit = f"atol={atol:g} rtol={rtol:g}"
    return Check(name, diff.max().item(), rel.max().item(), limit, ok)


def weight_check(
    ours: torch.nn.Module, theirs: torch.nn.Module, initial: dict[str, Tensor]
) -> Check:
    """Our weights against the same-named Hugging Face weights, after both took the same steps.

    ok when the difference is at most WEIGHT_RTOL of TRL's total update (the norms over all
    weights). A max-abs bound would not do: AdamW's first steps move every weight by about lr,
    whatever the size of its gradient, so a gradient within rounding of zero may move it either
    way on the two sides.
    """
    hf = dict(theirs.named_parameters())
    diff_sq, update_sq, worst = 0.0, 0.0, 0.0
    for name, p in ours.named_parameters():
        mine, other = p.detach(), hf[rename(name, OURS_TO_HF)].detach()
        diff = (mine - other).double()
        diff_sq += diff.square().sum().item()
        update_sq += (other - initial[name]).double().square().sum().item()
        worst = max(worst, diff.abs().max().item())
    rel = (diff_sq / max(update_sq, 1e-300)) ** 0.5
    limit = f"|ours - trl| <= {WEIGHT_RTOL:g} |trl update|"
    return Check("weights after 2 steps", worst, rel, limit, update_sq > 0 and rel <= WEIGHT_RTOL)


def as_records(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(check) for check in checks]
