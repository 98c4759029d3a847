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

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ropo import audit, distributed
from ropo.checkpoint import save_checkpoint
from ropo.config import RunConfig
from ropo.data import TokenizedPair
from ropo.distributed import is_main
from ropo.faults import maybe_crash
from ropo.filter.weights import DropDecision, select_drops
from ropo.models.llama import Transformer
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
    """Run the whole ROPO pipeline described by `cfg`; returns the run directory."""
    run = start_run(cfg)
    device = run.step.device
    # Several processes share the reference scoring; one reads or fills the cache alone.
    several = distributed.world_size() > 1
    with autocast(device, run.step.autocast):
        ref = (distributed.shared_reference_logps if several else reference_logps)(
            run.model_dir,
            run.data.tokens,
            cfg.run.cache_dir or run.out / "cache",
            cfg.optim.batch_size * 2,
            run.tokenizer.pad_id,
            run.dtype,
            device,
        )
    policy, optimizer, state = start_or_resume(run)
    ref = ref.extend(sampled_ref_logps(state.sampled)) if state.sampled else ref
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
        save_checkpoint(
            run.out, f"round-{round_idx + 1}", policy, optimizer, checkpoint_state(state, run)
        )
    save_final(run, policy)
    if is_main():
        if state.n_skipped_nonfinite:
            print(f"skip_nonfinite: {state.n_skipped_nonfinite} steps skipped for a NaN/inf value")
        print(
            f"done: {run.out}/final (model), {run.out}/pairs.jsonl, {run.out}/metrics.jsonl, "
            f"{run.out}/cleaned.jsonl"
        )
    distributed.teardown()
    return run.out


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
    for step_idx in range(state.step_in_epoch, len(steps)):
        lr = learning_rate(state.global_step, total_steps, cfg.optim)
        stats = train_step(policy, optimizer, steps[step_idx], ref, run.loss_fn, lr, run.step)
        check_step(stats, state, cfg.run.skip_nonfinite, run.out)
        state.global_step += 1
        state.step_in_epoch = step_idx + 1
        bar.update(1)
        bar.set_postfix(
            loss=f"{stats.loss:.4f}",
            acc=f"{stats.reward_accuracy:.2f}",
            margin=f"{stats.margin:.3f}",
        )
        if is_main():
            log_step(run.out, state, stats, cfg.run.log_every)
        if cfg.run.save_every and state.global_step % cfg.run.save_every == 0:
            save_checkpoint(
                run.out,
                f"step-{state.global_step:07d}",
                policy,
                optimizer,
                checkpoint_state(state, run),
            )
    bar.close()
    state.epoch, state.step_in_epoch = epoch + 1, 0


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
