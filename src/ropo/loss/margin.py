"""The margin Δ and the implicit reward: the two quantities every loss, the w-step and the audit
are written in.

Stage: log-probs → reference cache → **loss** → filter. Every log-prob tensor is (N,), one value
per pair, summed over response tokens (or their mean, for IPO); nothing here reduces over pairs.
"""

from torch import Tensor


def preference_margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """Δ = (policy_chosen − ref_chosen) − (policy_rejected − ref_rejected), shape (N,): how much
    more than the reference the policy prefers chosen to rejected (DPO paper eq. 7 has β·Δ)."""
    shapes = {
        tuple(x.shape)
        for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1:
        # Broadcasting (N,) against (N, 1) would silently give an (N, N) "loss".
        raise ValueError(f"log-prob tensors must share one shape (N,), got shapes {sorted(shapes)}")
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def implicit_reward(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """r(y) = β·(log π_θ(y|x) − log π_ref(y|x)) per response, same shape as the inputs (DPO
    paper eq. 5). The reward of chosen minus that of rejected is β·Δ."""
    return beta * (policy_logps - ref_logps)


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
    chosen_rewards = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach()
    return chosen_rewards, rejected_rewards
