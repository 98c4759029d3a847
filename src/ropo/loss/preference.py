"""Preference losses: per-pair policy and reference log-probs in, one loss value per pair out.

Stage: log-probs → reference cache → **loss** → filter. Each loss is a function of the margin
alone; `get_loss` binds one with its parameters into a callable on the four log-prob tensors.
Averaging and the w-step weights are applied by the caller; nothing here reduces over pairs.

Notation: N pairs; every log-prob tensor is (N,). Δ = (policy_chosen − ref_chosen) −
(policy_rejected − ref_rejected) is the margin (margin.py), t = β·Δ, σ the logistic function.
`beta` is the DPO β (KL strength), `alpha` the ROPO α, `label_smoothing` the flip rate ε of
cDPO/rDPO, each as in its paper. Log-probs are SUMMED over response tokens, except for IPO, which
takes MEAN log-probs. The parameters are checked once, when the config is read (config.py); the
defaults are the config's.
"""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from ropo.config import LossSettings
from ropo.loss.margin import preference_margin


def dpo_loss(margin: Tensor, beta: float) -> Tensor:
    """Per-pair DPO loss −log σ(β·Δ), shape (N,), Δ from summed log-probs. DPO paper eq. 7.

    Gradient weight −∂ℓ/∂t = σ(−t): largest for the pairs the policy contradicts most.
    """
    return -F.logsigmoid(beta * margin)


def ipo_loss(margin: Tensor, beta: float) -> Tensor:
    """Per-pair IPO loss (Δ − 1/(2β))², shape (N,). Azar et al. 2023 eq. 17 (their τ is our β).

    Δ from MEAN (length-averaged) log-probs over response tokens, as TRL does: with summed
    log-probs the fixed target 1/(2β) would mean something different for long and short responses.
    """
    return (margin - 1 / (2 * beta)) ** 2


def cdpo_loss(
    margin: Tensor, beta: float, *, label_smoothing: float = LossSettings.label_smoothing
) -> Tensor:
    """Per-pair conservative DPO (1−ε)·(−log σ(t)) + ε·(−log σ(−t)), shape (N,), summed log-probs.

    Mitchell 2023, "A note on DPO with noisy preferences": DPO on labels assumed flipped at rate ε.
    """
    t = beta * margin
    return (1 - label_smoothing) * -F.logsigmoid(t) + label_smoothing * -F.logsigmoid(-t)


def rdpo_loss(
    margin: Tensor, beta: float, *, label_smoothing: float = LossSettings.label_smoothing
) -> Tensor:
    """Per-pair robust DPO [(1−ε)·(−log σ(t)) − ε·(−log σ(−t))] / (1 − 2ε), shape (N,).

    Summed log-probs. Chowdhury et al. 2024, "Provably robust DPO": an unbiased estimate of the
    clean DPO loss when labels flip at a known rate ε < 0.5.
    """
    t = beta * margin
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(t) - eps * -F.logsigmoid(-t)) / (1 - 2 * eps)


def noise_aware_loss(margin: Tensor, beta: float) -> Tensor:
    """ROPO's noise-aware term ℓ_na = σ(−t), shape (N,), summed log-probs; not meant to train alone.

    Symmetric, ℓ_na(Δ) + ℓ_na(−Δ) = 1, so symmetric flips at rate η < 0.5 only rescale the risk:
    (1 − 2η)·R_clean + η. Its gradient σ(t)σ(−t) vanishes for confident pairs either way.
    """
    return torch.sigmoid(-(beta * margin))


def ropo_scale(alpha: float) -> float:
    """4α/(1+α)²: the factor that makes ROPO's peak gradient weight exactly 1 (see
    `ropo_gradient_weight`), and its weight for a confidently contradicted pair (t → −∞)."""
    return 4 * alpha / (1 + alpha) ** 2


def ropo_loss(margin: Tensor, beta: float, *, alpha: float = LossSettings.alpha) -> Tensor:
    """Per-pair ROPO loss 4α/(1+α)² · (−log σ(t) + α·σ(−t)), shape (N,), summed log-probs.

    Liang et al. 2404.04102: DPO plus α times the noise-aware term ℓ_na = σ(−t), scaled by
    `ropo_scale`. α > 2 (config.py checks it and says why).
    """
    t = beta * margin
    return ropo_scale(alpha) * (-F.logsigmoid(t) + alpha * torch.sigmoid(-t))


def ropo_gradient_weight(margin_t: Tensor, alpha: float = LossSettings.alpha) -> Tensor:
    """−∂ℓ_ropo/∂t = 4α/(1+α)² · σ(−t)·(1 + α·σ(t)) at t = β·Δ, same shape as `margin_t`.

    Peaks at exactly 1 where σ(t) = (α−1)/(2α), i.e. t = ln((α−1)/(α+1)); tends to 4α/(1+α)² as
    t → −∞ (a confidently contradicted pair, likely flipped) and to 0 as t → +∞.
    """
    return ropo_scale(alpha) * torch.sigmoid(-margin_t) * (1 + alpha * torch.sigmoid(margin_t))


# The `loss` key's names (config.LOSS_NAMES) to the functions above.
LOSSES: dict[str, Callable[..., Tensor]] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "cdpo": cdpo_loss,
    "rdpo": rdpo_loss,
    "ropo": ropo_loss,
}
# Losses whose formula expects MEAN log-probs over response tokens; all others take SUMMED ones.
LENGTH_NORMALIZED = frozenset({"ipo"})


@dataclass(frozen=True)
class PreferenceLoss:
    """LOSSES[name] with β and its own parameters bound (get_loss makes one); call it on the
    four (N,) log-prob tensors. `length_normalized`: pass MEAN log-probs (IPO), else SUMMED."""

    name: str
    beta: float
    params: Mapping[str, float]

    @property
    def length_normalized(self) -> bool:
        return self.name in LENGTH_NORMALIZED

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
    ) -> Tensor:
        """Per-pair loss, shape (N,), not reduced."""
        margin = preference_margin(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
        return LOSSES[self.name](margin, self.beta, **self.params)


def get_loss(name: str, beta: float = LossSettings.beta, **params: float) -> PreferenceLoss:
    """LOSSES[name] with β and its parameters bound; the ones left out take the function's own
    defaults (the config's: ropo alpha = 14, cdpo/rdpo label_smoothing = 0.1). A parameter the
    loss does not take (get_loss("dpo", alpha=3)) is a TypeError here, not at the first call."""
    # The loss function's keyword parameters are its declaration; no second list to keep in step.
    arguments = inspect.signature(LOSSES[name]).bind_partial(beta=beta, **params)
    arguments.apply_defaults()
    bound = {key: value for key, value in arguments.arguments.items() if key != "beta"}
    # Read-only, so a loss bound once cannot be changed under a running loop.
    return PreferenceLoss(name, beta, MappingProxyType(bound))
