"""The ROPO training loop: the one module that wires every stage together.

    config -> tokenizer and data (+ injected noise) -> policy and reference log-prob cache
    for each round:  train on the kept pairs (+ sampled pairs) with the chosen loss  (theta-step)
                     score every pair with the policy, keep the lowest-loss (1 - rho) N  (w-step)
                     write the audit; optionally sample new pairs for dropped prompts
`loss=dpo rounds=1 rho=0` is plain DPO through the same code. Under torchrun every process runs
this same loop; distributed.py shards the model, the steps and the scoring, and rank 0 writes.
Setup, resume and the final save are in run_setup.py; rejection sampling is in resample.py.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ropo import audit, distributed, interrupt, run_dir
from ropo.checkpoint import save_checkpoint
from ropo.config import RunConfig
from ropo.data import TokenizedPair
from ropo.distributed import is_main
from ropo.faults import maybe_crash
from ropo.filter.weights import DropDecision, select_drops
from ropo.interrupt import Interrupted
from ropo.models.llama import Transformer
from ropo.models.lora import has_lora
from ropo.ref_cache import RefLogps, reference_logps
from ropo.resample import sample_replacements, sampled_pair, sampled_ref_logps
from ropo.run_setup import LoopState, Run, checkpoint_state, save_final, start_or_resume, start_run
from ropo.step import (
    StepStats,
    autocast,
    epoch_steps,
    learning_rate,
    pair_losses,
    planned_steps,
    train_step,
)


def train(cfg: RunConfig) -> Path:
    """Run the whole ROPO pipeline described by `cfg`; returns the run directory.

    The run directory stays locked while the run lives. Ctrl-C or SIGTERM (with `interrupt.handled`
    in force, as under the CLI) raise `Interrupted`, which says where the run stopped.
    """
    out = Path(cfg.run.resume or cfg.run.out)
    run_dir.check_writable_dir(out, "out")
    if cfg.run.cache_dir:
        run_dir.check_writable_dir(Path(cfg.run.cache_dir), "cache_dir")
    with run_dir.locked(out):
        run = start_run(cfg)
        ref = reference(run)
        policy, optimizer, state = start_or_resume(run)
        ref = ref.extend(sampled_ref_logps(state.sampled)) if state.sampled else ref
        try:
            train_rounds(run, policy, optimizer, ref, state)
        except Interrupted as stop:
            stop.where = position(state, cfg)
            raise
        save_final(run, policy)
        if is_main():
            if state.n_skipped_nonfinite:
                print(f"skip_nonfinite: {state.n_skipped_nonfinite} steps skipped for a NaN/inf")
            print(
                f"done: {run.out}/final (model), {run.out}/pairs.jsonl, {run.out}/metrics.jsonl, "
                f"{run.out}/cleaned.jsonl"
            )
    distributed.teardown()
    return run.out


def position(state: LoopState, cfg: RunConfig) -> str:
    """Where the loop stands, in words (1-based, as on the progress bars)."""
    where = f"round {state.round_idx + 1}/{cfg.filter.rounds}"
    if state.epoch >= cfg.optim.epochs:
        return f"at the end of {where} (scoring or sampling), after global step {state.global_step}"
    return f"in {where}, epoch {state.epoch + 1}, after global step {state.global_step}"


def reference(run: Run) -> RefLogps:
    """Reference log-probs of every pair: read from the cache, or computed once and cached."""
    # Several processes share the reference scoring; one reads or fills the cache alone.
    several = distributed.world_size() > 1
    with autocast(run.step.device, run.step.autocast):
        return (distributed.shared_reference_logps if several else reference_logps)(
            run.model_dir,
            run.data.tokens,
            run.cfg.run.cache_dir or run.out / "cache",
            run.cfg.optim.batch_size * 2,
            run.tokenizer.pad_id,
            run.dtype,
            run.step.device,
        )


def train_rounds(
    run: Run, policy: Transformer, optimizer: torch.optim.Optimizer, ref: RefLogps, state: LoopState
) -> None:
    """The rounds of ROPO from where `state` stands: theta-step, w-step, optional resampling."""
    cfg, device = run.cfg, run.step.device
    by_id = {pair.id: pair for pair in run.data.tokens}
    for round_idx in range(state.round_idx, cfg.filter.rounds):
        kept = state.kept_ids if state.kept_ids is not None else list(by_id)
        train_pairs = [by_id[i] for i in kept] + [sampled_pair(s) for s in state.sampled]
        for epoch in range(state.epoch, cfg.optim.epochs):
            train_epoch(run, policy, optimizer, ref, state, train_pairs, round_idx, epoch)
        with autocast(device, run.step.autocast):
            decision = end_of_round(run, policy, ref, round_idx, state.n_skipped_nonfinite)
        state.sampled = []
        if cfg.filter.rejection_sampling and round_idx + 1 < cfg.filter.rounds:
            with autocast(device, run.step.autocast):
                state.sampled = sample_replacements(run, policy, decision, round_idx)
            ref = ref.extend(sampled_ref_logps(state.sampled))
        state.round_idx, state.epoch, state.kept_ids = round_idx + 1, 0, list(decision.kept_ids)
        maybe_crash("round_end")
        save(run, f"round-{round_idx + 1}", policy, optimizer, state)


def save(
    run: Run, name: str, policy: Transformer, optimizer: torch.optim.Optimizer, state: LoopState
) -> None:
    """save_checkpoint, timed: how long the last write took decides whether SIGTERM gets one."""
    start = time.perf_counter()
    save_checkpoint(run.out, name, policy, optimizer, checkpoint_state(state, run))
    run.checkpoint_seconds.append(time.perf_counter() - start)


def train_epoch(
    run: Run,
    policy: Transformer,
    optimizer: torch.optim.Optimizer,
    ref: RefLogps,
    state: LoopState,
    train_pairs: list[TokenizedPair],
    round_idx: int,
    epoch: int,
) -> None:
    """The theta-step for one epoch, from `state.step_in_epoch` on (a resumed run skips ahead)."""
    cfg = run.cfg
    steps = epoch_steps(train_pairs, cfg, round_idx, epoch)
    total_steps = planned_steps(len(run.data.tokens), cfg)
    desc = f"round {round_idx + 1}/{cfg.filter.rounds} epoch {epoch + 1}/{cfg.optim.epochs}"
    bar = tqdm(
        total=len(steps), initial=state.step_in_epoch, desc=desc, unit="step", disable=not is_main()
    )
    # SIGTERM waits for the step boundary, where a checkpoint can be taken; under torchrun the
    # ranks could see it at different steps, so there it stops the process at once. The bar is
    # closed on the way out, so that an error or interrupt line starts a line of its own.
    with bar, interrupt.deferred_sigterm(enabled=distributed.world_size() == 1):
        for step_idx in range(state.step_in_epoch, len(steps)):
            lr = learning_rate(state.global_step, total_steps, cfg.optim)
            stats = train_step(policy, optimizer, steps[step_idx], ref, run.loss_fn, lr, run.step)
            check_step(stats, state, cfg.run.skip_nonfinite, run.out)
            state.global_step += 1
            state.step_in_epoch = step_idx + 1
            bar.update(1)
            postfix = (stats.loss, stats.reward_accuracy, stats.margin)
            bar.set_postfix_str("loss={:.4f}, acc={:.2f}, margin={:.3f}".format(*postfix))
            if is_main():
                log_step(run.out, state, stats, cfg.run.log_every)
            if cfg.run.save_every and state.global_step % cfg.run.save_every == 0:
                save(run, f"step-{state.global_step:07d}", policy, optimizer, state)
            if interrupt.pending():
                stop_for_sigterm(run, policy, optimizer, state)
    state.epoch, state.step_in_epoch = epoch + 1, 0


def stop_for_sigterm(
    run: Run, policy: Transformer, optimizer: torch.optim.Optimizer, state: LoopState
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


def estimate_write(policy: Transformer) -> float:
    """Seconds a checkpoint write would take at a cautious 200 MB/s: trainable weights with their
    two AdamW moments in fp32, plus the frozen weights unless only adapters are saved (LoRA)."""
    params = list(policy.parameters())
    trainable = sum(p.numel() * (p.element_size() + 8) for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    return (trainable + (0 if has_lora(policy) else frozen)) / 200e6


def check_step(stats: StepStats, state: LoopState, skip_nonfinite: bool, out: Path) -> None:
    """Stop the run at a step that was not applied (NaN/inf), or count it if skip_nonfinite."""
    if not stats.skipped:
        return
    where = f"round {state.round_idx + 1}, global step {state.global_step + 1}"
    if not skip_nonfinite:
        raise FloatingPointError(
            f"{where}: {stats.skipped}. The step was not applied and no checkpoint follows it: "
            f"`ropo train resume={out}` continues from the last good one (add "
            f"skip_nonfinite=true to skip such steps)"
        )
    state.n_skipped_nonfinite += 1
    tqdm.write(f"{where}: {stats.skipped}; step skipped (skip_nonfinite=true)")


def end_of_round(
    run: Run, policy: Transformer, ref: RefLogps, round_idx: int, n_skipped_nonfinite: int
) -> DropDecision:
    """The w-step: score every pair with the policy, keep the (1 - rho) N lowest-loss pairs.

    Writes the round's audit lines, its metrics (with the run's count of skipped NaN/inf steps
    so far) and the cleaned dataset (kept pairs).
    """
    cfg, data, out = run.cfg, run.data, run.out
    ids = [pair.id for pair in data.tokens]
    scores = distributed.score_everywhere(  # every rank gets every pair's scores, by id
        policy,
        data.tokens,
        cfg.optim.batch_size * 2,
        run.step.pad_id,
        desc=f"scoring round {round_idx + 1}",
    )
    reference = ref.lookup(ids)
    with torch.no_grad():
        losses, _ = pair_losses(run.loss_fn, scores, reference)
    decision = select_drops(ids, losses, cfg.filter.rho)  # the same on every rank
    if is_main():
        records = audit.pair_records(
            round_idx, ids, scores, reference, losses, decision, cfg.loss.beta, data.flips
        )
        extra = {"n_skipped_nonfinite": n_skipped_nonfinite}
        metrics = audit.round_metrics(round_idx, records, decision, data.flips, extra)
        audit.append_jsonl(out / "pairs.jsonl", records)
        audit.append_jsonl(out / "metrics.jsonl", [metrics])
        audit.export_cleaned(out / "cleaned.jsonl", data.text, decision.kept_ids)
        print(audit.format_metrics(metrics))
    return decision


def log_step(out: Path, state: LoopState, stats: StepStats, every: int) -> None:
    """A train_log.jsonl line every `every` steps, and one for every skipped (NaN/inf) step."""
    record: dict[str, Any] = {"step": state.global_step, "round": state.round_idx}
    if stats.skipped:
        record["skipped"] = stats.skipped  # its loss and norms are NaN: nothing to plot
    elif state.global_step % every == 0:
        record |= {key: value for key, value in vars(stats).items() if key != "skipped"}
    else:
        return
    audit.append_jsonl(out / "train_log.jsonl", [record])
