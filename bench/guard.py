"""Correctness guard of the benchmark: both sides must compute the same numbers on the same step.

Same weights and same tokens must give TRL and us the same reference log-probs, the same policy
log-probs, the same loss and gradient norm on two optimizer steps, and the same weights after
them. Otherwise the timings compare two different computations and mean nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from fixtures import BETA, PAD_ID, step_batches
from our_side import OurSide, our_step
from parity import LOGP_RTOL, LOSS_TOL, NORM_RTOL, Check, compare, weight_check
from trl_side import trl_examples, trl_logps, trl_step

from ropo.data import TokenizedPair
from ropo.logps_fused import collate_pairs, response_logps
from ropo.loss import get_loss


def run_guard(ours: OurSide, trainer: Any, pairs: list[TokenizedPair], size: int) -> list[Check]:
    """Compare both freshly built sides, then run two steps on each and compare again.

    `ours` and `trainer` must come straight from build_ours / build_trainer on the same model
    directory and `pairs`; `size` is the number of pairs per step.
    """
    examples = trl_examples(trainer, pairs)
    ours_batches = step_batches(pairs, size)
    trl_batches = [examples[s : s + size] for s in range(0, len(examples), size)]

    def policy_check(name: str, k: int) -> list[Check]:
        with torch.no_grad():
            mine = response_logps(ours.model, collate_pairs(ours_batches[k], PAD_ID))
        chosen, rejected = trl_logps(trainer, trl_batches[k])
        return [
            compare(f"{name}: chosen logps", mine.chosen, chosen, rtol=LOGP_RTOL),
            compare(f"{name}: rejected logps", mine.rejected, rejected, rtol=LOGP_RTOL),
        ]

    initial = {name: p.detach().clone() for name, p in ours.model.named_parameters()}
    column = lambda key: torch.tensor([e[key] for e in examples])  # noqa: E731
    ref = ours.ref.lookup([p.id for p in pairs])
    checks = [
        compare("reference chosen logps", ref.chosen, column("ref_chosen_logps"), rtol=LOGP_RTOL),
        compare(
            "reference rejected logps", ref.rejected, column("ref_rejected_logps"), rtol=LOGP_RTOL
        ),
        *policy_check("policy at init, batch 0", 0),
    ]
    loss_fn = get_loss("dpo", beta=BETA)
    for k in range(2):
        mine = our_step(ours, loss_fn, ours_batches[k])
        loss, grad_norm = trl_step(trainer, trl_batches[k])
        checks.append(compare(f"step {k}: loss", mine.loss, loss, atol=LOSS_TOL, rtol=LOSS_TOL))
        checks.append(compare(f"step {k}: grad norm", mine.grad_norm, grad_norm, rtol=NORM_RTOL))
    checks += policy_check("policy after 2 steps, batch 2", 2)
    checks.append(weight_check(ours.model, trainer.model, initial))
    return checks
