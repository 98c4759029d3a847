"""Preference losses: per-pair log-probs (policy and cached reference) in, per-pair losses out.

Public interface:
    preference_margin(...) -> Δ (N,);  implicit_reward(logps, ref_logps, beta) -> β·(π − π_ref)
    dpo_loss, ipo_loss, cdpo_loss, rdpo_loss, ropo_loss, noise_aware_loss -> (N,) per-pair losses
    LOSSES (name -> function);  get_loss(name, beta=0.1, **params) -> PreferenceLoss, callable
        on the four (N,) log-prob tensors
    ropo_gradient_weight(margin_t, alpha) -> −∂ℓ_ropo/∂t;  implicit_rewards(...) -> for logging
"""

from ropo.loss.margin import implicit_reward, preference_margin
from ropo.loss.preference import (
    LOSSES,
    PreferenceLoss,
    cdpo_loss,
    dpo_loss,
    get_loss,
    implicit_rewards,
    ipo_loss,
    noise_aware_loss,
    rdpo_loss,
    ropo_gradient_weight,
    ropo_loss,
)

__all__ = [
    "LOSSES",
    "PreferenceLoss",
    "cdpo_loss",
    "dpo_loss",
    "get_loss",
    "implicit_reward",
    "implicit_rewards",
    "ipo_loss",
    "noise_aware_loss",
    "preference_margin",
    "rdpo_loss",
    "ropo_gradient_weight",
    "ropo_loss",
]
