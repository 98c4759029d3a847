"""Our side of the benchmark: the policy, its optimizer and the cached reference, as `train()` sets
them up, and one step of `ropo.step.train_step`.

A timed step is the whole of `train_step`: collate the pairs, one forward for chosen and rejected
rows, log-probs at the response positions, reference lookup in the cache, loss, backward,
gradient clipping and the AdamW step. Nothing here imports transformers or TRL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fixtures import LR, MAX_GRAD_NORM, PAD_ID

from ropo.config import OptimSettings
from ropo.data import TokenizedPair
from ropo.loss import PreferenceLoss
from ropo.models import load_model
from ropo.models.llama import Transformer
from ropo.ref_cache import RefLogps, reference_logps
from ropo.step import StepSettings, StepStats, make_optimizer, train_step


@dataclass
class OurSide:
    model: Transformer
    optimizer: torch.optim.Optimizer
    ref: RefLogps
    settings: StepSettings
    ref_miss_seconds: float  # reference model loaded, every pair scored, cache written


def reference(
    model_dir: Path, pairs: list[TokenizedPair], cache_dir: Path, batch_size: int
) -> tuple[RefLogps, float]:
    """The cached reference log-probs and the seconds it took to get them."""
    start = time.perf_counter()
    ref = reference_logps(model_dir, pairs, cache_dir, batch_size, PAD_ID)
    return ref, time.perf_counter() - start


def build_ours(
    model_dir: Path, pairs: list[TokenizedPair], cache_dir: Path, pairs_per_step: int
) -> OurSide:
    """Reference cache first (as train() does), then the policy in train mode and its AdamW."""
    ref, miss_seconds = reference(model_dir, pairs, cache_dir, 2 * pairs_per_step)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    model.train()
    optimizer = make_optimizer(model, OptimSettings(lr=LR, weight_decay=0.0))
    settings = StepSettings(PAD_ID, MAX_GRAD_NORM, torch.device("cpu"), autocast=None)
    return OurSide(model, optimizer, ref, settings, miss_seconds)


def our_step(side: OurSide, loss_fn: PreferenceLoss, pairs: list[TokenizedPair]) -> StepStats:
    """One optimizer step on `pairs` (a single micro-batch) at the constant benchmark lr."""
    return train_step(side.model, side.optimizer, [pairs], side.ref, loss_fn, LR, side.settings)
