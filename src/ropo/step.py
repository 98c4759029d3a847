"""One optimizer step of the theta-step, with the step order and the learning-rate schedule.

Micro-batches of pairs -> policy log-probs -> loss against the cached reference -> AdamW. Sits
after distributed.py (which shares each step out under torchrun); train.py calls it every step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TypeVar

import torch

from ropo import distributed
from ropo.config import OptimSettings, RunConfig
from ropo.data import TokenizedPair
from ropo.distributed import rank_share, sum_over_ranks
from ropo.filter.weights import keep_count
from ropo.logps import PairLogps
from ropo.logps_fused import collate_pairs, response_logps
from ropo.loss import PreferenceLoss, preference_margin
from ropo.models.llama import Transformer
from ropo.ref_cache import RefLogps
from ropo.sft_config import SftConfig

Item = TypeVar("Item")  # what a batch holds: a TokenizedPair, or an SFT example


@dataclass(frozen=True)
class StepSettings:
    """What every training step needs besides the model, the optimizer and the data."""

    pad_id: int
    max_grad_norm: float
    device: torch.device
    autocast: torch.dtype | None  # None: compute in the weights' dtype


@dataclass
class StepStats:
    loss: float
    reward_accuracy: float
    margin: float
    grad_norm: float
    lr: float
    skipped: str = ""  # why the step was not applied (NaN/inf); "" when it was


def make_optimizer(model: Transformer, cfg: OptimSettings) -> torch.optim.Optimizer:
    """AdamW over every trained parameter: all of them, or the LoRA adapters.

    The fused kernel (CPU and CUDA) updates every tensor in one pass; transformers' Trainer picks
    it too. Same update rule, fewer passes over the weights and moments.
    """
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.999),
        fused=True,
    )


def round_epochs(cfg: RunConfig, round_idx: int) -> int:
    """Epochs of round `round_idx` (0-based): `epochs`, or `last_round_epochs` for the last."""
    if round_idx == cfg.filter.rounds - 1 and cfg.filter.last_round_epochs:
        return cfg.filter.last_round_epochs
    return cfg.optim.epochs


def restarts(cfg: RunConfig, round_idx: int) -> bool:
    """Whether round `round_idx` trains a fresh policy with plain DPO (last_round=restart)."""
    return cfg.filter.last_round == "restart" and round_idx == cfg.filter.rounds - 1


def planned_steps(n_pairs: int, n_train_pairs: int, round_idx: int, cfg: RunConfig) -> int:
    """The length of the learning-rate schedule that round `round_idx` follows, in steps.

    One schedule spans every round, planned as if each trained on all N = `n_pairs` pairs: later
    rounds train on (1 - rho) N kept pairs plus at most rho N sampled ones, so the real count is
    at most this; the decay then ends slightly above zero, never past it. A restarted last round
    is a new run: it gets a schedule of its own over its `n_train_pairs` (kept and sampled).
    """
    pairs_per_step = cfg.optim.batch_size * cfg.optim.grad_accum
    if restarts(cfg, round_idx):
        return round_epochs(cfg, round_idx) * math.ceil(n_train_pairs / pairs_per_step)
    rounds = [r for r in range(cfg.filter.rounds) if not restarts(cfg, r)]
    return sum(round_epochs(cfg, r) for r in rounds) * math.ceil(n_pairs / pairs_per_step)


def steps_to_go(
    n_pairs: int, n_train_pairs: int, round_idx: int, epoch: int, step_in_epoch: int, cfg: RunConfig
) -> int:
    """Optimizer steps left from (round_idx, epoch, step_in_epoch) while training on
    `n_train_pairs` this round: for the progress line, not the schedule. Later rounds train on
    the kept (1 - rho) N (with rho=auto: as many as this round); pairs that rejection sampling
    will add are not known yet."""
    pairs_per_step = cfg.optim.batch_size * cfg.optim.grad_accum
    epochs = round_epochs(cfg, round_idx)
    this_round = (epochs - epoch) * math.ceil(n_train_pairs / pairs_per_step) - step_in_epoch
    rho = cfg.filter.rho
    kept = n_train_pairs if rho == "auto" else keep_count(n_pairs, rho)
    later = range(round_idx + 1, cfg.filter.rounds)
    return this_round + sum(round_epochs(cfg, r) for r in later) * math.ceil(kept / pairs_per_step)


def learning_rate(step: int, total_steps: int, cfg: OptimSettings) -> float:
    """Linear warm-up over warmup_ratio of the steps, then cosine/linear decay or constant."""
    warmup = int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr


def epoch_steps(
    items: list[Item], cfg: RunConfig | SftConfig, round_idx: int, epoch: int
) -> list[list[list[Item]]]:
    """The epoch as optimizer steps, each a list of micro-batches of pairs (or, for `ropo sft`,
    of examples; round_idx 0).

    The order is a permutation seeded by (seed, round, epoch) alone, so a resumed run replays the
    same batches; the last step may be short.
    """
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + round_idx * 1009 + epoch)
    order = torch.randperm(len(items), generator=generator).tolist()
    size, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    micro = [[items[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
    return [micro[s : s + accum] for s in range(0, len(micro), accum)]


def train_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[list[TokenizedPair]],
    ref: RefLogps,
    loss_fn: PreferenceLoss,
    lr: float,
    settings: StepSettings,
) -> StepStats:
    """One optimizer step: the per-pair loss averaged over every pair of the step, then AdamW.

    Each micro-batch's summed loss is divided by the step's total pair count before backward, so
    accumulation gives exactly the gradient of one big batch; under torchrun each rank takes its
    share of every micro-batch and the count is still the step's total. A NaN/inf loss or
    gradient norm applies nothing: the gradients are cleared, AdamW does not step, `skipped`
    says why.
    Statistics stay on the device until one read at the end, so the host never waits mid-step.
    """
    n_pairs = sum(len(mb) for mb in micro_batches)  # over all ranks (pitfall 21)
    sums = torch.zeros(3, device=settings.device)  # loss, correct pairs, margin
    finite = []  # (ids, per-pair finiteness) of each micro-batch
    for pairs, n_real in rank_share(micro_batches):  # in one process: every pair, all real
        batch = collate_pairs(pairs, settings.pad_id).to(settings.device)
        with autocast(settings.device, settings.autocast):
            policy = response_logps(model, batch)
        reference = ref.lookup(batch.ids).to(settings.device)
        losses, margins = pair_losses(loss_fn, policy, reference)
        losses, margins = losses[:n_real], margins[:n_real]  # a filler pair counts for nothing
        (losses.sum() / n_pairs).backward()
        sums += torch.stack([losses.detach().sum(), (margins > 0).sum(), margins.sum()])
        finite.append((batch.ids[:n_real], torch.isfinite(losses.detach())))
    grad_norm = clip_gradients(model, settings.max_grad_norm)
    all_finite = torch.stack([mask.all() for _, mask in finite]).all()
    sums = sum_over_ranks(torch.cat([sums, (~all_finite)[None].float()]))  # + ranks with NaN/inf
    loss_sum, correct, margin_sum, n_bad, norm = torch.cat(
        [sums, grad_norm[None].float()]
    ).tolist()  # the step's only host-device synchronisation
    if n_bad:
        bad = [
            i
            for ids, mask in finite
            for i, good in zip(ids, mask.tolist(), strict=True)
            if not good
        ]
        return skipped_step(optimizer, f"non-finite loss for pairs {bad[:10]}", lr)
    if not math.isfinite(norm):
        ids = [pair.id for pairs in micro_batches for pair in pairs]
        reason = f"non-finite gradient norm {norm} for the step's {len(ids)} pairs {ids[:10]}"
        return skipped_step(optimizer, reason, lr)
    apply_step(optimizer, lr)
    return StepStats(loss_sum / n_pairs, correct / n_pairs, margin_sum / n_pairs, norm, lr)


def apply_step(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """AdamW at learning rate `lr` with the gradients in place, then clear them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def skipped_step(optimizer: torch.optim.Optimizer, reason: str, lr: float) -> StepStats:
    """The stats of a step that applied nothing; its gradients are cleared here."""
    optimizer.zero_grad(set_to_none=True)
    nan = float("nan")
    return StepStats(nan, nan, nan, nan, lr, skipped=reason)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 matmuls with fp32 weights when asked; a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def pair_losses(
    loss_fn: PreferenceLoss, policy: PairLogps, reference: PairLogps
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (N,) and margins (N,), in the log-prob convention the loss asks for."""
    if loss_fn.length_normalized:
        policy, reference = policy.mean(), reference.mean()
    losses = loss_fn(policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    margins = preference_margin(
        policy.chosen, policy.rejected, reference.chosen, reference.rejected
    )
    return losses, margins.detach()


def policy_preferences(loss_fn: PreferenceLoss, policy: PairLogps) -> torch.Tensor:
    """log pi(chosen) - log pi(rejected) per pair (N,), in the loss's log-prob convention: the
    margin plus the reference's own preference, for filter_score=preference."""
    if loss_fn.length_normalized:
        policy = policy.mean()
    return (policy.chosen - policy.rejected).detach()


def clip_gradients(model: Transformer, max_grad_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping, as a 0-d tensor (NaN/inf: the caller checks)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    return distributed.plain_tensor(norm)  # under FSDP a DTensor over the ranks' shards
