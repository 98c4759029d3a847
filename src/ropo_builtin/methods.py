"""The methods the built-in task compares, as `ropo train` keys: DPO, its relatives told the flip
rate (cDPO, rDPO) or not (IPO), and ROPO with a fixed or an estimated rho, with or without
rejection sampling. `recipe` owns the three that ropo_constraints runs too; the rest build on it.
"""

from __future__ import annotations

from typing import Any

from ropo_builtin.settings import NOISE_SHARE, TaskSettings

# The rejection-sampling pair rule that helps here (docs/method.md 4): the default rule's pairs
# are mostly wrongly ordered by round 2.
RS_RULE = "likelihood+original"


def recipe(method: str, rounds: int, epochs: int, rho: float | str, alpha: float) -> dict[str, Any]:
    """The `ropo train` keys of dpo, ropo (`rounds` rounds of `epochs` epochs, dropping a share
    `rho` after each) or ropo_auto. DPO trains as many epochs as ROPO does in all its rounds; so
    does ropo_auto's restarted last round."""
    if method == "dpo":
        return {"loss": "dpo", "rounds": 1, "rho": 0.0, "epochs": rounds * epochs}
    if method == "ropo":
        return {"loss": "ropo", "alpha": alpha, "rounds": rounds, "rho": rho, "epochs": epochs}
    if method != "ropo_auto":
        raise ValueError(f"no recipe for method {method!r}: dpo, ropo or ropo_auto")
    # Round 1 finds the flips with the ROPO loss on all pairs, ranked by the policy's own
    # preference (docs/method.md 3b); round 2 starts again from the starting model and trains
    # plain DPO on the kept pairs, as long as DPO trains on all of them.
    return {
        "loss": "ropo",
        "alpha": alpha,
        "rounds": 2,
        "rho": "auto",
        "filter_score": "preference",
        "last_round": "restart",
        "last_round_epochs": rounds * epochs,
        "epochs": epochs,
    }


def method_keys(method: str, s: TaskSettings, noise: float) -> dict[str, Any]:
    """The `ropo train` keys that make `method` (settings.METHOD_LABELS) at flip rate `noise`:
    cDPO, rDPO and IPO train like DPO; the ROPO variants like ROPO or ROPO (rho=auto)."""
    dpo, ropo, auto = (
        recipe(name, s.rounds, s.epochs_per_round, s.rho, s.alpha)
        for name in ("dpo", "ropo", "ropo_auto")
    )
    if method in NOISE_SHARE:  # cdpo, rdpo and their η/2 variants: ε from the true flip rate
        loss, epsilon = method.removesuffix("_half"), NOISE_SHARE[method] * noise
        return {**dpo, "loss": loss, "label_smoothing": epsilon}
    variants = {
        "dpo_clean": dpo,
        "dpo": dpo,
        "ipo": {**dpo, "loss": "ipo"},
        "ropo_loss": {**dpo, "loss": "ropo", "alpha": s.alpha},
        "ropo": ropo,
        "ropo_rs": {**ropo, "rejection_sampling": True, "rs_k": s.rs_k, "rs_pair_rule": RS_RULE},
        "ropo_auto": auto,
        # The margin ranking does not help on this task (docs/method.md 3b); this run shows it.
        "ropo_auto_margin": {**auto, "filter_score": "margin"},
    }
    return variants[method]
