"""When a training loop (train.py, sft.py) writes checkpoints: on schedule (save_every, end of a
round or epoch) and on SIGTERM; and how it stops at a step it could not apply (NaN/inf).

Every write is timed: on SIGTERM (deferred to a step boundary by interrupt.py) the last write's
time decides whether another fits in the scheduler's grace period before its SIGKILL.
"""

from __future__ import annotations

import signal
import time

import torch
from tqdm.auto import tqdm

from ropo.checkpoint import save_checkpoint
from ropo.distributed import is_main
from ropo.interrupt import Interrupted
from ropo.models.llama import Transformer
from ropo.models.lora import has_lora
from ropo.training_run import LoopPosition, TrainingRun, checkpoint_state

# A cautious write speed for the estimate before a run's first checkpoint.
ASSUMED_WRITE_BYTES_PER_S = 200e6


def save(
    run: TrainingRun,
    name: str,
    policy: Transformer,
    optimizer: torch.optim.Optimizer,
    state: LoopPosition,
) -> None:
    """save_checkpoint, timed: how long the last write took decides whether SIGTERM gets one."""
    start = time.perf_counter()
    state_saved = checkpoint_state(state, run)
    save_checkpoint(run.out, name, policy, optimizer, state_saved, tokenizer=run.tokenizer_files)
    run.checkpoint_seconds.append(time.perf_counter() - start)


def stop_for_sigterm(
    run: TrainingRun, policy: Transformer, optimizer: torch.optim.Optimizer, state: LoopPosition
) -> None:
    """After a deferred SIGTERM: checkpoint this step boundary when the write fits in half the
    scheduler's grace period (`term_grace`; the last write's time, or an estimate before the
    first), then raise Interrupted."""
    name = f"step-{state.global_step:07d}"
    seconds = run.checkpoint_seconds[-1] if run.checkpoint_seconds else estimate_write(policy)
    already = (run.out / "checkpoints" / name).is_dir()  # save_every just wrote it
    if not already and seconds < run.cfg.run.term_grace / 2:
        save(run, name, policy, optimizer, state)
    elif not already and is_main():
        print(f"SIGTERM: no checkpoint, it would take about {seconds:.0f} s (term_grace)")
    raise Interrupted(signal.SIGTERM)


def check_step(run: TrainingRun, state: LoopPosition, skipped: str, where: str) -> None:
    """Stop the run at a step that was not applied (`skipped` says why; "" when it was), or
    count it if skip_nonfinite; `where` names the step."""
    if not skipped:
        return
    if not run.cfg.run.skip_nonfinite:
        raise FloatingPointError(
            f"{where}: {skipped}. The step was not applied and no checkpoint follows it: "
            f"`{run.cfg.command} resume={run.out}` continues from the last good one (add "
            f"skip_nonfinite=true to skip such steps)"
        )
    state.n_skipped_nonfinite += 1
    tqdm.write(f"{where}: {skipped}; step skipped (skip_nonfinite=true)")


def estimate_write(policy: Transformer) -> float:
    """Seconds a checkpoint write would take at ASSUMED_WRITE_BYTES_PER_S: trainable weights
    with their two AdamW moments in fp32, plus the frozen weights unless only adapters are saved
    (LoRA)."""
    params = list(policy.parameters())
    trainable = sum(p.numel() * (p.element_size() + 8) for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    return (trainable + (0 if has_lora(policy) else frozen)) / ASSUMED_WRITE_BYTES_PER_S
