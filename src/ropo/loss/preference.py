"""Preference losses: per-pair policy and reference log-probs in, one loss value per pair out.

Stage: log-probs → reference cache → **loss** → filter. Averaging and the w-step weights are
applied by the caller; nothing here reduces over pairs.

Notation: N pairs; every log-prob tensor is (N,). Δ = (policy_chosen − ref_chosen) −
(policy_rejected − ref_rejected) is the margin, t = β·Δ, σ the logistic function. `beta` is the
DPO β (KL strength), `alpha` the ROPO α, `label_smoothing` the flip rate ε of cDPO/rDPO, each as in
its paper. Log-probs are SUMMED over response tokens, except for IPO, which takes MEAN log-probs.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from ropo.config import check_alpha, check_beta, check_label_smoothing

# α = 14 as the paper's reviews and an independent re-implementation report it (the paper's own
# tables could not be consulted); the ablations reported use 6, 14 and 30.
ROPO_ALPHA = 14.0
LABEL_SMOOTHING = 0.1  # default ε for cDPO/rDPO when the config does not give one


def _margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """Δ, shape (N,): how much more than the reference the policy prefers chosen to rejected."""
    shapes = {
        tuple(x.shape)
        for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1:
        # Broadcasting (N,) against (N, 1) would silently give an (N, N) "loss".
        raise ValueError(f"log-prob tensors must share one shape (N,), got shapes {sorted(shapes)}")
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def implicit_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """Detached implicit rewards β·(policy − ref) for chosen and rejected, each (N,), for logging.

    Their difference is the margin t = β·Δ; at step 0 (policy == reference) both are 0.
    """
    check_beta(beta)
    _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Per-pair DPO loss −log σ(β·Δ), shape (N,), from summed log-probs. DPO paper eq. 7.

    Gradient weight −∂ℓ/∂t = σ(−t): largest for the pairs the policy contradicts most.
    """
    check_beta(beta)
    t = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return -F.logsigmoid(t)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Per-pair IPO loss (Δ − 1/(2β))², shape (N,). Azar et al. 2023 eq. 17 (their τ is our β).

    Takes MEAN (length-averaged) log-probs over response tokens, as TRL does: with summed log-probs
    the fixed target 1/(2β) would mean something different for long and short responses.
    """
    check_beta(beta)
    margin = _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (margin - 1 / (2 * beta)) ** 2


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    *,
    label_smoothing: float = LABEL_SMOOTHING,
) -> Tensor:
    """Per-pair conservative DPO (1−ε)·(−log σ(t)) + ε·(−log σ(−t)), shape (N,), summed log-probs.

    Mitchell 2023, "A note on DPO with noisy preferences": DPO on labels assumed flipped at rate ε.
    """
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    t = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (1 - label_smoothing) * -F.logsigmoid(t) + label_smoothing * -F.logsigmoid(-t)


def rdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    *,
    label_smoothing: float = LABEL_SMOOTHING,
) -> Tensor:
    """Per-pair robust DPO [(1−ε)·(−log σ(t)) − ε·(−log σ(−t))] / (1 − 2ε), shape (N,).

    Summed log-probs. Chowdhury et al. 2024, "Provably robust DPO": an unbiased estimate of the
    clean DPO loss when labels flip at a known rate ε < 0.5.
    """
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    t = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(t) - eps * -F.logsigmoid(-t)) / (1 - 2 * eps)


def noise_aware_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """ROPO's noise-aware term ℓ_na = σ(−t), shape (N,), summed log-probs; not meant to train alone.

    Symmetric, ℓ_na(Δ) + ℓ_na(−Δ) = 1, so symmetric flips at rate η < 0.5 only rescale the risk:
    (1 − 2η)·R_clean + η. Its gradient σ(t)σ(−t) vanishes for confident pairs either way.
    """
    check_beta(beta)
    t = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return torch.sigmoid(-t)


def ropo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    *,
    alpha: float = ROPO_ALPHA,
) -> Tensor:
    """Per-pair ROPO loss 4α/(1+α)² · (−log σ(t) + α·σ(−t)), shape (N,), summed log-probs.

    Liang et al. 2404.04102: DPO plus α times the noise-aware term ℓ_na = σ(−t). The factor
    4α/(1+α)² scales the peak gradient weight to exactly 1 (see `ropo_gradient_weight`). α > 2.
    """
    check_beta(beta)
    check_alpha(alpha)
    t = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    scale = 4 * alpha / (1 + alpha) ** 2
    return scale * (-F.logsigmoid(t) + alpha * torch.sigmoid(-t))


def ropo_gradient_weight(margin_t: Tensor, alpha: float = ROPO_ALPHA) -> Tensor:
    """−∂ℓ_ropo/∂t = 4α/(1+α)² · σ(−t)·(1 + α·σ(t)) at t = β·Δ, same shape as `margin_t`.

    Peaks at exactly 1 where σ(t) = (α−1)/(2α), i.e. t = ln((α−1)/(α+1)); tends to 4α/(1+α)² as
    t → −∞ (a confidently contradicted pair, likely flipped) and to 0 as t → +∞.
    """
    check_alpha(alpha)
    scale = 4 * alpha / (1 + alpha) ** 2
    return scale * torch.sigmoid(-margin_t) * (1 + alpha * torch.sigmoid(margin_t))


LOSSES: dict[str, Callable[..., Tensor]] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "cdpo": cdpo_loss,
    "rdpo": rdpo_loss,
    "ropo": ropo_loss,
}

# Each loss's own parameters and their defaults; anything else passed to get_loss is an error.
LOSS_PARAMS: dict[str, dict[str, float]] = {
    "dpo": {},
    "ipo": {},
    "cdpo": {"label_smoothing": LABEL_SMOOTHING},
    "rdpo": {"label_smoothing": LABEL_SMOOTHING},
    "ropo": {"alpha": ROPO_ALPHA},
}

_PARAM_CHECKS: dict[str, Callable[[float], None]] = {
    "label_smoothing": check_label_smoothing,
    "alpha": check_alpha,
}

# Losses whose formula expects MEAN log-probs over response tokens; all others take SUMMED ones.
LENGTH_NORMALIZED = frozenset({"ipo"})


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss chosen by name with its β and parameters bound; call it like the bare loss function.

    `length_normalized` tells the training loop which log-probs to pass: MEAN over response tokens
    when True (IPO), SUMMED otherwise.
    """

    name: str
    beta: float
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; known losses: {sorted(LOSSES)}")
        check_beta(self.beta)
        expected = LOSS_PARAMS[self.name].keys()
        unknown = sorted(set(self.params) - set(expected))
        missing = sorted(set(expected) - set(self.params))
        if unknown or missing:
            raise ValueError(
                f"loss {self.name!r} takes parameters {sorted(expected)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        params = {key: float(value) for key, value in self.params.items()}
        for key, value in params.items():
            _PARAM_CHECKS[key](value)
        # Read-only, so a loss bound once cannot be changed under a running loop.
        object.__setattr__(self, "params", MappingProxyType(params))

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
        loss_fn = LOSSES[self.name]
        return loss_fn(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            self.beta,
            **self.params,
        )


def get_loss(name: str, beta: float = 0.1, **params: float) -> PreferenceLoss:
    """The loss `name` (a key of LOSSES) with β and its parameters bound; omitted ones get defaults.

    Defaults: ropo alpha = 14, cdpo/rdpo label_smoothing = 0.1. A parameter the loss does not take
    (get_loss("dpo", alpha=3)) raises ValueError rather than being ignored.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return PreferenceLoss(name, beta, {**LOSS_PARAMS[name], **params})
