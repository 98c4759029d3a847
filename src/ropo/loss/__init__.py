"""Preference losses: per-pair log-probs (policy and cached reference) in, per-pair losses out.

Public interface:
    get_loss(name, beta=0.1, **params) -> PreferenceLoss, callable on the four (N,) log-prob tensors
    LOSSES (name -> function), LOSS_PARAMS (name -> {param: default})
    dpo_loss, ipo_loss, cdpo_loss, rdpo_loss, ropo_loss, noise_aware_loss -> (N,) per-pair losses
    ropo_gradient_weight(margin_t, alpha) -> −∂ℓ_ropo/∂t;  implicit_rewards(...) -> for logging
"""

from ropo.loss.preference import (
    LOSS_PARAMS,
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
    "LOSS_PARAMS",
    "LOSSES",
    "PreferenceLoss",
    "cdpo_loss",
    "dpo_loss",
    "get_loss",
    "implicit_rewards",
    "ipo_loss",
    "noise_aware_loss",
    "rdpo_loss",
    "ropo_gradient_weight",
    "ropo_loss",
]
