"""Preference losses: worked numbers, formulas written out independently, gradients, invariants.

Every expected value below can be checked with a pocket calculator from the comments next to it.
"""

import math

import numpy as np
import pytest
import torch

from ropo.config import LOSS_NAMES, LossSettings
from ropo.filter.detection import reward_accuracy
from ropo.loss import (
    LOSSES,
    cdpo_loss,
    dpo_loss,
    get_loss,
    implicit_rewards,
    ipo_loss,
    noise_aware_loss,
    preference_margin,
    rdpo_loss,
    ropo_gradient_weight,
    ropo_loss,
)

# Two pairs, β = 0.5.
#   pair 0: chosen −11 → −10 (+1), rejected −11 → −12 (−1): Δ = 1 − (−1) = 2,  t = βΔ = 1
#   pair 1: chosen −5 → −5 (0),    rejected −5 → −4 (+1):   Δ = 0 − 1 = −1,    t = −0.5
POLICY_CHOSEN = [-10.0, -5.0]
POLICY_REJECTED = [-12.0, -4.0]
REF_CHOSEN = [-11.0, -5.0]
REF_REJECTED = [-11.0, -5.0]
BETA = 0.5
# Hand values at t = (1, −0.5):
#   −log σ(t)  = log(1 + e^−t) = (0.313262, 0.974077)
#   −log σ(−t) = −log σ(t) + t = (1.313262, 0.474077)
#   σ(−t)      = 1 / (1 + e^t) = (0.268941, 0.622459)
WORKED = {
    "dpo": [0.313262, 0.974077],
    # (Δ − 1/(2β))² with 1/(2β) = 1: (2 − 1)² = 1, (−1 − 1)² = 4
    "ipo": [1.0, 4.0],
    # ε = 0.1: 0.9·(−log σ(t)) + 0.1·(−log σ(−t)) = −log σ(t) + 0.1·t
    "cdpo": [0.413262, 0.924077],
    # ε = 0.1: [0.9·(−log σ(t)) − 0.1·(−log σ(−t))] / 0.8 = −log σ(t) − t/8
    "rdpo": [0.188262, 1.036577],
    # α = 14: 56/225 · (−log σ(t) + 14·σ(−t)) = 0.248889 · (0.313262 + 3.765174) for pair 0
    "ropo": [1.015079, 2.411362],
}


def _tensors(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(row, dtype=torch.float64) for row in rows]


def _worked_inputs() -> list[torch.Tensor]:
    return _tensors(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)


def _random_inputs(n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-50 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("name", sorted(WORKED))
def test_worked_example(name: str) -> None:
    loss = get_loss(name, beta=BETA)  # defaults: ε = 0.1, α = 14
    got = loss(*_worked_inputs())
    assert got.shape == (2,)
    torch.testing.assert_close(
        got, torch.tensor(WORKED[name], dtype=torch.float64), atol=1e-6, rtol=0
    )


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)  # log(1 + e^x), stable


def _numpy_reference(name: str, delta: np.ndarray, beta: float) -> np.ndarray:
    """Each formula again, in numpy, from the notes rather than from the code under test."""
    t = beta * delta
    nll = _softplus(-t)  # −log σ(t)
    nll_flipped = _softplus(t)  # −log σ(−t)
    if name == "dpo":
        return nll
    if name == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if name == "cdpo":
        return 0.8 * nll + 0.2 * nll_flipped
    if name == "rdpo":
        return (0.8 * nll - 0.2 * nll_flipped) / (1 - 2 * 0.2)
    if name == "ropo":
        alpha = 6.0
        return 4 * alpha / (1 + alpha) ** 2 * (nll + alpha / (1 + np.exp(t)))
    raise AssertionError(name)


RANDOM_PARAMS = {
    "cdpo": {"label_smoothing": 0.2},
    "rdpo": {"label_smoothing": 0.2},
    "ropo": {"alpha": 6.0},
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_matches_formula_on_random_inputs(name: str, beta: float) -> None:
    inputs = _random_inputs()
    got = get_loss(name, beta=beta, **RANDOM_PARAMS.get(name, {}))(*inputs)
    pc, pr, rc, rr = (x.numpy() for x in inputs)
    want = _numpy_reference(name, (pc - rc) - (pr - rr), beta)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_bound_loss_equals_bare_function() -> None:
    inputs = _random_inputs()
    margin = preference_margin(*inputs)
    pairs = [
        (get_loss("dpo", beta=0.3), dpo_loss(margin, 0.3)),
        (get_loss("ipo", beta=0.3), ipo_loss(margin, 0.3)),
        (get_loss("cdpo", beta=0.3), cdpo_loss(margin, 0.3, label_smoothing=0.1)),
        (get_loss("rdpo", beta=0.3), rdpo_loss(margin, 0.3, label_smoothing=0.1)),
        (get_loss("ropo", beta=0.3), ropo_loss(margin, 0.3, alpha=14.0)),
    ]
    for bound, bare in pairs:
        torch.testing.assert_close(bound(*inputs), bare, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name: str) -> None:
    loss = get_loss(name, beta=0.7)
    inputs = [x.clone().div(10).requires_grad_() for x in _random_inputs(n=5, seed=1)]
    assert torch.autograd.gradcheck(loss, tuple(inputs))


def _ropo_of_t(t: torch.Tensor, alpha: float) -> torch.Tensor:
    # With β = 1, Δ = t.
    return ropo_loss(t, 1.0, alpha=alpha)


@pytest.mark.parametrize("alpha", [3.0, 6.0, 14.0, 30.0])
def test_ropo_gradient_weight_matches_autograd_and_finite_differences(alpha: float) -> None:
    t = torch.linspace(-12, 12, 97, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_ropo_of_t(t, alpha).sum(), t)
    weight = ropo_gradient_weight(t.detach(), alpha)
    torch.testing.assert_close(-grad, weight, rtol=1e-12, atol=1e-12)

    h = 1e-5
    with torch.no_grad():
        t0 = t.detach()
        central = (_ropo_of_t(t0 + h, alpha) - _ropo_of_t(t0 - h, alpha)) / (2 * h)
    torch.testing.assert_close(-central, weight, rtol=0, atol=1e-8)


def test_ropo_gradient_weight_scales_with_beta() -> None:
    # ∂ℓ/∂(policy_chosen) = β·∂ℓ/∂t, so the per-log-prob gradient is β times the weight.
    pc, pr, rc, rr = _random_inputs(n=8, seed=2)
    pc.requires_grad_()
    beta = 0.1
    (grad,) = torch.autograd.grad(ropo_loss(preference_margin(pc, pr, rc, rr), beta).sum(), pc)
    t = beta * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(-grad, beta * ropo_gradient_weight(t), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [3.0, 6.0, 14.0, 30.0])
def test_ropo_gradient_weight_peaks_at_exactly_one(alpha: float) -> None:
    # Weight = c·(1 − s)(1 + αs) with s = σ(t), c = 4α/(1+α)². The quadratic in s peaks at
    # s = (α−1)/(2α) with value (1+α)²/(4α) = 1/c, so the weight peaks at 1, at t = ln((α−1)/(α+1)).
    grid = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    weights = ropo_gradient_weight(grid, alpha)
    assert weights.max().item() == pytest.approx(1.0, abs=1e-9)
    t_star = math.log((alpha - 1) / (alpha + 1))
    assert grid[weights.argmax()].item() == pytest.approx(t_star, abs=1e-3)
    peak = ropo_gradient_weight(torch.tensor([t_star], dtype=torch.float64), alpha)
    assert peak.item() == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize(
    ("alpha", "floor_exact", "floor_approx"),
    [(6.0, 24 / 49, 0.4898), (14.0, 56 / 225, 0.2489), (30.0, 120 / 961, 0.1249)],
)
def test_ropo_gradient_weight_limits(alpha: float, floor_exact: float, floor_approx: float) -> None:
    # t → −∞: σ(t) → 0, weight → c = 4α/(1+α)²: 24/49, 56/225, 120/961.  t → +∞: σ(−t) → 0.
    far = torch.tensor([-60.0, 60.0], dtype=torch.float64)
    at_minus_inf, at_plus_inf = ropo_gradient_weight(far, alpha).tolist()
    assert at_minus_inf == pytest.approx(floor_exact, rel=1e-12)
    assert at_minus_inf == pytest.approx(floor_approx, abs=1e-4)
    assert at_plus_inf < 1e-20


@pytest.mark.parametrize("alpha", [2.01, 3.0, 14.0])
def test_alpha_above_two_gives_contradicted_pairs_less_gradient_than_ambiguous(
    alpha: float,
) -> None:
    # At t = 0 the weight is c·½·(1 + α/2) = c·(2+α)/4, which beats c (t → −∞) only when α > 2.
    ambiguous, contradicted = ropo_gradient_weight(torch.tensor([0.0, -60.0]), alpha).tolist()
    assert contradicted < ambiguous
    # DPO's weight σ(−t) does the opposite: 0.5 at t = 0, → 1 as t → −∞.


@pytest.mark.parametrize("alpha", [6.0, 14.0, 30.0])
def test_step_zero_invariant(alpha: float) -> None:
    # π_θ = π_ref: every Δ is 0, so t = 0, −log σ(0) = ln 2 and σ(0) = ½.
    logps_chosen, logps_rejected = _random_inputs(n=6, seed=3)[:2]
    same = (logps_chosen, logps_rejected, logps_chosen.clone(), logps_rejected.clone())
    margin = preference_margin(*same)
    ln2 = math.log(2)
    full = torch.full((6,), 1.0, dtype=torch.float64)
    torch.testing.assert_close(dpo_loss(margin, 0.1), ln2 * full)
    torch.testing.assert_close(cdpo_loss(margin, 0.1, label_smoothing=0.2), ln2 * full)
    torch.testing.assert_close(rdpo_loss(margin, 0.1, label_smoothing=0.2), ln2 * full)
    # ROPO: 4α/(1+α)² · (ln 2 + α·½); α = 14: 0.248889 · 7.693147 = 1.914739
    want_ropo = 4 * alpha / (1 + alpha) ** 2 * (ln2 + alpha / 2)
    torch.testing.assert_close(ropo_loss(margin, 0.1, alpha=alpha), want_ropo * full)
    if alpha == 14.0:
        assert want_ropo == pytest.approx(1.914739, abs=1e-6)
    # IPO: (0 − 1/(2β))² = (1/0.2)² = 25 at β = 0.1
    torch.testing.assert_close(ipo_loss(margin, 0.1), 25.0 * full)

    chosen_rewards, rejected_rewards = implicit_rewards(*same, 0.1)
    assert not chosen_rewards.any() and not rejected_rewards.any()
    assert reward_accuracy(chosen_rewards - rejected_rewards) == 0.0  # ties count as wrong


def test_noise_aware_term_is_symmetric() -> None:
    # Swapping chosen and rejected negates Δ; σ(−t) + σ(t) = 1, so ℓ_na(Δ) + ℓ_na(−Δ) = 1.
    pc, pr, rc, rr = _random_inputs(seed=4)
    margin, margin_swapped = preference_margin(pc, pr, rc, rr), preference_margin(pr, pc, rr, rc)
    forward = noise_aware_loss(margin, 0.1)
    swapped = noise_aware_loss(margin_swapped, 0.1)
    torch.testing.assert_close(forward + swapped, torch.ones_like(forward))
    # Hence under symmetric flips at rate η the expected loss is (1 − 2η)·ℓ_na + η: same minimiser.
    eta = 0.3
    noisy = (1 - eta) * forward + eta * swapped
    torch.testing.assert_close(noisy, (1 - 2 * eta) * forward + eta)
    # DPO has no such property: at Δ = 0 the two sides sum to 2 ln 2, elsewhere to something else.
    dpo_sum = dpo_loss(margin, 0.1) + dpo_loss(margin_swapped, 0.1)
    assert not torch.allclose(dpo_sum, dpo_sum[0].expand_as(dpo_sum))


def test_ropo_is_scaled_dpo_plus_alpha_noise_aware() -> None:
    margin = preference_margin(*_random_inputs(seed=5))
    alpha, beta = 6.0, 0.2
    want = 24 / 49 * (dpo_loss(margin, beta) + alpha * noise_aware_loss(margin, beta))
    torch.testing.assert_close(ropo_loss(margin, beta, alpha=alpha), want)


def test_get_loss_defaults_and_length_flags() -> None:
    assert dict(get_loss("ropo").params) == {"alpha": 14.0}
    assert get_loss("ropo").beta == 0.1
    assert dict(get_loss("cdpo").params) == {"label_smoothing": 0.1}
    assert dict(get_loss("rdpo", label_smoothing=0.25).params) == {"label_smoothing": 0.25}
    assert dict(get_loss("dpo").params) == {}
    flags = {name: get_loss(name).length_normalized for name in LOSSES}
    assert flags == {"dpo": False, "ipo": True, "cdpo": False, "rdpo": False, "ropo": False}
    with pytest.raises(TypeError):
        get_loss("ropo").params["alpha"] = 3.0  # read-only once bound


# The loss parameters are checked once, when the config is read (LossSettings); the loss
# functions trust them.
def test_the_config_names_exactly_the_losses_of_the_table() -> None:
    assert tuple(LOSSES) == LOSS_NAMES
    with pytest.raises(ValueError, match=r"'loss' = 'simpo' is not one of dpo, ipo, cdpo, rdpo"):
        LossSettings(loss="simpo")


@pytest.mark.parametrize("alpha", [2.0, 1.0, 0.0, -5.0, math.nan, math.inf])
def test_ropo_rejects_alpha_at_most_two(alpha: float) -> None:
    with pytest.raises(
        ValueError,
        match=rf"'alpha': ROPO alpha must be a finite number > 2, got {alpha!r}.*ambiguous",
    ):
        LossSettings(loss="ropo", alpha=alpha)


def test_get_loss_rejects_params_the_loss_does_not_take() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'alpha'"):
        get_loss("dpo", alpha=3.0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'label_smoothing'"):
        get_loss("ropo", label_smoothing=0.1)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1, math.nan])
@pytest.mark.parametrize("name", ["cdpo", "rdpo"])
def test_label_smoothing_must_be_below_half(name: str, eps: float) -> None:
    with pytest.raises(
        ValueError, match=rf"'label_smoothing': label_smoothing must be in \[0, 0.5\), got {eps!r}"
    ):
        LossSettings(loss=name, label_smoothing=eps)


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_beta_must_be_positive(name: str, beta: float) -> None:
    with pytest.raises(
        ValueError, match=rf"'beta': beta must be a finite number > 0, got {beta!r}"
    ):
        LossSettings(loss=name, beta=beta)


def test_mismatched_shapes_are_rejected() -> None:
    # (N,) against (N, 1) would broadcast to an (N, N) loss without this check.
    pc, pr, rc, rr = _worked_inputs()
    with pytest.raises(ValueError, match=r"share one shape.*\(2, 1\)"):
        get_loss("dpo", beta=0.1)(pc, pr, rc.unsqueeze(1), rr)
