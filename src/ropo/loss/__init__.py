"""Preference losses: per-pair log-probs (policy and cached reference) in, per-pair losses out.

Public interface:
    preference_margin(4 log-prob tensors) -> Δ (N,)
    implicit_reward(logps, ref_logps, beta) -> β·(log π − log π_ref);  implicit_rewards(...) -> both
    dpo_loss, ipo_loss, cdpo_loss, rdpo_loss, ropo_loss, noise_aware_loss: (Δ, beta) -> (N,) losses
    LOSSES (name -> function);  get_loss(name, beta=0.1, **params) -> PreferenceLoss, callable
        on the four (N,) log-prob tensors
    ropo_gradient_weight(margin_t, alpha) -> −∂ℓ_ropo/∂t
"""

from ropo.loss.margin import implicit_reward, implicit_rewards, preference_margin
from ropo.loss.preference import (
    LOSSES,
    PreferenceLoss,
    cdpo_loss,
    dpo_loss,
    get_loss,
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
