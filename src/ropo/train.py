"""The ROPO training loop: the one module that wires every stage together.

    config -> tokenizer and data (+ injected noise) -> policy and reference log-prob cache
    for each round:  train on the kept pairs (+ sampled pairs) with the chosen loss  (theta-step)
                     score every pair with the policy, keep the highest-margin (1 - rho) N  (w-step)
                     (rho=auto: rho is the flip rate estimated from those margins)
                     write the audit; optionally sample new pairs for dropped prompts
    last_round=restart: the last round trains a fresh policy with plain DPO on the kept pairs
`loss=dpo rounds=1 rho=0` is plain DPO through the same code. Under torchrun every process runs
this same loop; distributed.py shards the model, the steps and the scoring, and rank 0 writes.
What a run fixes before its loop (its pairs, reference log-probs and loop state, fresh or
resumed) is run_setup.py's; the policy and its final save are policy.py's; checkpoints on
schedule and on SIGTERM are saving.py's; rejection sampling is resample.py's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ropo import audit, distributed, interrupt, run_dir
from ropo.config import RunConfig
from ropo.data import TokenizedPair
from ropo.distributed import is_main
from ropo.evaluate import heldout_metrics
from ropo.filter.noise_rate import estimate_flip_rate
from ropo.filter.rejection import SampledPair
from ropo.filter.weights import DropDecision, select_drops
from ropo.interrupt import Interrupted
from ropo.jsonl import append_jsonl
from ropo.loss import PreferenceLoss, get_loss
from ropo.models import load_model
from ropo.models.llama import Transformer
from ropo.policy import Learner, save_final
from ropo.progress import RunProgress, progress_bar
from ropo.ref_cache import RefLogps
from ropo.resample import sample_replacements, sampled_record, sampled_ref_logps
from ropo.run_setup import LoopState, Run, reference, start_or_resume, start_run
from ropo.saving import check_step, save, stop_for_sigterm
from ropo.step import (
    StepStats,
    autocast,
    epoch_steps,
    learning_rate,
    pair_losses,
    planned_steps,
    policy_preferences,
    restarts,
    round_epochs,
    steps_to_go,
    train_step,
)
from ropo.summary import run_summary
from ropo.training_run import run_inputs


def train(cfg: RunConfig) -> Path:
    """Run the whole ROPO pipeline described by `cfg`; returns the run directory.

    A missing model or data file fails before the run directory is made (run_inputs); the
    directory stays locked while the run lives. Ctrl-C or SIGTERM (with `interrupt.handled` in
    force, as under the CLI) raise `Interrupted`, which says where the run stopped.
    """
    inputs = run_inputs(cfg)
    with run_dir.locked(inputs.out):
        start = time.perf_counter()
        run = start_run(cfg, inputs)
        ref = reference(run, run.data.tokens)
        heldout_ref = reference(run, run.data.heldout.tokens) if run.data.heldout else None
        learner, state = start_or_resume(run)
        ref = ref.extend(sampled_ref_logps(state.sampled)) if state.sampled else ref
        run_bar = RunProgress(cfg.filter.rounds, state.global_step, not is_main())
        try:
            train_rounds(run, learner, ref, state, heldout_ref, run_bar)
        except Interrupted as stop:
            stop.where = state.position(cfg)
            raise
        finally:
            run_bar.close()
        save_final(run, learner.policy)
        if is_main():
            wall = time.perf_counter() - start
            print(run_summary(run.out, run.data.summary, wall, state.n_skipped_nonfinite))
    distributed.teardown()
    return run.out


def train_rounds(
    run: Run,
    learner: Learner,
    ref: RefLogps,
    state: LoopState,
    heldout_ref: RefLogps | None,
    run_bar: RunProgress,
) -> None:
    """The rounds of ROPO from where `state` stands: theta-step, w-step, optional resampling;
    the held-out pairs (if any) are scored at the start and after every round."""
    cfg, device = run.cfg, run.step.device
    by_id = {pair.id: pair for pair in run.data.tokens}
    if state.global_step == 0:  # the policy is still the initial one
        state.eval_start = evaluate_heldout(run, learner.policy, heldout_ref, "held-out, start")
    for round_idx in range(state.round_idx, cfg.filter.rounds):
        kept = state.kept_ids if state.kept_ids is not None else list(by_id)
        train_pairs = [by_id[i] for i in kept] + [pair.tokens for pair in state.sampled]
        now_at = (round_idx, state.epoch, state.step_in_epoch)
        to_go = steps_to_go(len(by_id), len(train_pairs), *now_at, cfg)
        run_bar.set_total(state.global_step + to_go)
        schedule = planned_steps(len(by_id), len(train_pairs), round_idx, cfg)
        for epoch in range(state.epoch, round_epochs(cfg, round_idx)):
            steps = epoch_steps(train_pairs, cfg, round_idx, epoch)
            train_epoch(run, learner, ref, state, steps, schedule, heldout_ref, run_bar)
        policy = learner.policy
        extra = {"n_skipped_nonfinite": state.n_skipped_nonfinite}  # for the metrics line
        extra |= evaluate_heldout(run, policy, heldout_ref, f"held-out, round {round_idx + 1}")
        if round_idx == 0:  # the start values go into round 1's line (README)
            extra |= {f"{key}_start": value for key, value in state.eval_start.items()}
        with autocast(device, run.step.autocast):
            decision = end_of_round(run, policy, ref, round_idx, extra)
        state.sampled = []
        if cfg.filter.rejection_sampling and round_idx + 1 < cfg.filter.rounds:
            state.sampled = resample(run, policy, decision, round_idx)
            ref = ref.extend(sampled_ref_logps(state.sampled))
        del policy
        if restarts(cfg, round_idx + 1):
            restart_policy(run, learner, state)
        state.round_idx, state.epoch, state.kept_ids = round_idx + 1, 0, list(decision.kept_ids)
        save(run, f"round-{round_idx + 1}", learner.policy, learner.optimizer, state)


def restart_policy(run: Run, learner: Learner, state: LoopState) -> None:
    """last_round=restart: the last round starts again from the model directory, with a fresh
    AdamW and a learning-rate schedule of its own, so that none of what the earlier rounds
    learned from the flipped pairs they trained on carries into the final policy."""
    learner.restart(run)
    state.schedule_start = state.global_step


def round_loss(run: Run, round_idx: int) -> PreferenceLoss:
    """The loss round `round_idx` trains and scores with: the configured one, or plain DPO (at
    the same beta) for a restarted last round."""
    if restarts(run.cfg, round_idx):
        return get_loss("dpo", beta=run.cfg.loss.beta)
    return run.loss_fn


def train_epoch(
    run: Run,
    learner: Learner,
    ref: RefLogps,
    state: LoopState,
    steps: list[list[list[TokenizedPair]]],
    schedule: int,
    heldout_ref: RefLogps | None,
    run_bar: RunProgress,
) -> None:
    """The theta-step for one epoch's `steps` (micro-batches of pairs), from
    `state.step_in_epoch` on (a resumed run skips ahead), on a learning-rate schedule `schedule`
    steps long that began at `state.schedule_start`; the held-out pairs are scored every
    `eval_every` steps."""
    cfg = run.cfg
    policy, optimizer = learner.policy, learner.optimizer
    loss_fn = round_loss(run, state.round_idx)
    rounds, epochs = cfg.filter.rounds, round_epochs(cfg, state.round_idx)
    desc = f"round {state.round_idx + 1}/{rounds} epoch {state.epoch + 1}/{epochs}"
    bar = progress_bar(
        total=len(steps), initial=state.step_in_epoch, desc=desc, unit="step",
        disable=not is_main(), leave=False,
    )  # fmt: skip
    # SIGTERM waits for the step boundary, where a checkpoint can be taken; under torchrun the
    # ranks could see it at different steps, so there it stops the process at once. The bar is
    # closed on the way out, so that an error or interrupt line starts a line of its own.
    with bar, interrupt.deferred_sigterm(enabled=distributed.world_size() == 1):
        for step_idx in range(state.step_in_epoch, len(steps)):
            lr = learning_rate(state.global_step - state.schedule_start, schedule, cfg.optim)
            stats = train_step(policy, optimizer, steps[step_idx], ref, loss_fn, lr, run.step)
            where = f"round {state.round_idx + 1}, global step {state.global_step + 1}"
            check_step(run, state, stats.skipped, where)
            state.global_step += 1
            state.step_in_epoch = step_idx + 1
            postfix = (stats.loss, stats.reward_accuracy, stats.margin)
            bar.set_postfix_str("loss={:.4f}, acc={:.2f}, margin={:.3f}".format(*postfix))
            bar.update(1)
            run_bar.step(state.round_idx + 1)
            evaluation = {}
            if cfg.heldout.eval_every and state.global_step % cfg.heldout.eval_every == 0:
                desc = f"held-out, step {state.global_step}"
                evaluation = evaluate_heldout(run, policy, heldout_ref, desc)
            if is_main():
                log_step(run.out, state, stats, cfg.run.log_every, evaluation)
            if cfg.run.save_every and state.global_step % cfg.run.save_every == 0:
                save(run, f"step-{state.global_step:07d}", policy, optimizer, state)
            if interrupt.pending():
                stop_for_sigterm(run, policy, optimizer, state)
    state.epoch, state.step_in_epoch = state.epoch + 1, 0


def end_of_round(
    run: Run, policy: Transformer, ref: RefLogps, round_idx: int, extra: dict[str, Any]
) -> DropDecision:
    """The w-step: score every pair with the policy, keep the (1 - rho) N highest-margin pairs
    (for ROPO and DPO: the lowest-loss ones; filter/weights.py says why the margin), or with
    filter_score=preference the highest log pi(chosen)/pi(rejected). With rho=auto, rho is the
    share of flipped pairs estimated from those scores (noise_rate.py).

    Writes the round's audit lines, its metrics (with `extra`: the run's count of skipped NaN/inf
    steps so far, the held-out metrics; and the noise estimate and the rho used) and the cleaned
    dataset (kept pairs).
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
        loss_fn = round_loss(run, round_idx)
        losses, margins = pair_losses(loss_fn, scores, reference)
        ranking = (
            margins if cfg.filter.filter_score == "margin" else policy_preferences(loss_fn, scores)
        )
    noise_estimate = estimate_flip_rate(ranking)  # recorded also when rho is fixed
    rho = noise_estimate if cfg.filter.rho == "auto" else cfg.filter.rho
    decision = select_drops(ids, ranking, rho)  # the same on every rank
    extra = {"noise_estimate": noise_estimate, "rho_used": rho, **extra}
    if is_main():
        records = audit.pair_records(
            round_idx + 1, ids, scores, reference, losses, decision, cfg.loss.beta, data.flips
        )
        metrics = audit.round_metrics(round_idx + 1, records, decision, data.flips, extra)
        append_jsonl(out / "pairs.jsonl", records)
        append_jsonl(out / "metrics.jsonl", [metrics])
        audit.export_cleaned(out / "cleaned.jsonl", data.text, decision.kept_ids, data.flips)
        tqdm.write(audit.format_metrics(metrics))  # a line of its own, under the progress bars
    return decision


def resample(
    run: Run, policy: Transformer, decision: DropDecision, round_idx: int
) -> list[SampledPair]:
    """New pairs for the prompts of the pairs round `round_idx` dropped (resample.py), written
    to <out>/sampled_pairs.jsonl. The reference model is loaded for this alone, to score the
    new responses, and freed again."""
    dropped = set(decision.dropped_ids)
    pairs = [pair for pair in run.data.tokens if pair.id in dropped]
    tokenizer, device = run.tokenizer, run.step.device
    with autocast(device, run.step.autocast):
        reference = load_model(run.reference_dir, dtype=run.dtype, device=device)
        sampled = sample_replacements(policy, reference, pairs, round_idx, run.sampling, tokenizer)
    del reference
    records = [sampled_record(pair, tokenizer) for pair in sampled]
    append_jsonl(run.out / "sampled_pairs.jsonl", records)
    return sampled


def log_step(
    out: Path, state: LoopState, stats: StepStats, every: int, evaluation: dict[str, float]
) -> None:
    """A train_log.jsonl line every `every` steps, one for every skipped (NaN/inf) step, and
    one with the held-out `evaluation` whenever there is one (every eval_every steps)."""
    record: dict[str, Any] = {"step": state.global_step, "round": state.round_idx + 1}
    if stats.skipped:
        record["skipped"] = stats.skipped  # its loss and norms are NaN: nothing to plot
    elif state.global_step % every == 0:
        record |= {key: value for key, value in vars(stats).items() if key != "skipped"}
    elif not evaluation:
        return
    append_jsonl(out / "train_log.jsonl", [record | evaluation])


def evaluate_heldout(
    run: Run, policy: Transformer, heldout_ref: RefLogps | None, desc: str
) -> dict[str, float]:
    """eval_accuracy, eval_margin (mean, nats) and eval_loss (DPO at the run's beta, whatever
    loss trains) of the policy on the held-out pairs (evaluate.py); {} when there are none."""
    if heldout_ref is None:
        return {}
    pairs = run.data.heldout.tokens
    with autocast(run.step.device, run.step.autocast):
        scores = distributed.score_everywhere(  # under torchrun every rank takes part
            policy, pairs, run.cfg.optim.batch_size * 2, run.step.pad_id, desc=desc
        )
    reference = heldout_ref.lookup([pair.id for pair in pairs])
    metrics = heldout_metrics(scores, reference, run.cfg.loss.beta)
    return {
        "eval_accuracy": metrics.accuracy,
        "eval_margin": metrics.margin_mean,
        "eval_loss": metrics.loss_mean,
    }
