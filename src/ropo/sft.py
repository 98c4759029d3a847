"""`ropo sft`: supervised fine-tuning on demonstrations, the step before preference training.

    config -> tokenizer and examples (sft_data.py) -> policy (+ LoRA adapters)
    every optimizer step: mean negative log-likelihood per response token (the prompt's tokens
    carry no loss), then AdamW  ->  <out>/final, a model directory `ropo train model=` reads

Around the loop everything is `ropo train`'s: the run directory and its lock, run.json with the
run's id and input fingerprints, checkpoints and an exact resume, Ctrl-C and SIGTERM, LoRA and the
final save (training_run.py, policy.py, saving.py); so are the batch order, the optimizer and the
learning-rate schedule (step.py). <out>/metrics.jsonl gets one line per optimizer step. One
process only.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ropo import interrupt, run_dir
from ropo.data import DataReport
from ropo.fingerprints import fingerprint_rows
from ropo.interrupt import Interrupted
from ropo.jsonl import append_jsonl, read_jsonl, truncate_jsonl
from ropo.logps import collate_sequences
from ropo.logps_fused import sequence_logps
from ropo.models import Tokenizer
from ropo.models.chat_format import load_chat_format
from ropo.models.llama import Transformer
from ropo.policy import policy_and_optimizer, policy_tokenizer, save_final
from ropo.progress import PlainProgress, progress_bar
from ropo.resources import pick_device
from ropo.run_info import write_run_info
from ropo.saving import check_step, save, stop_for_sigterm
from ropo.sft_config import SftConfig, SftOptimSettings
from ropo.sft_data import SftExample, load_demonstrations, tokenize_demonstrations
from ropo.step import StepSettings, apply_step, autocast, clip_gradients, epoch_steps, learning_rate
from ropo.training_run import LoopPosition, RunInputs, TrainingRun, identify_run, run_inputs


@dataclass(frozen=True, kw_only=True)
class SftRun(TrainingRun):
    """A `ropo sft` run: also its examples and the line that says how they were read."""

    examples: list[SftExample]
    data_summary: str


@dataclass
class SftStepStats:
    loss: float  # mean negative log-likelihood per response token of the step, in nats
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # response tokens of the step
    skipped: str = ""  # why the step was not applied (NaN/inf); "" when it was


def sft(cfg: SftConfig) -> Path:
    """Fine-tune `model` on the examples of `data` as `cfg` says; returns the run directory, whose
    final/ holds the model. Ctrl-C or SIGTERM (under interrupt.handled) raise Interrupted, which
    says where the run stopped."""
    inputs = run_inputs(cfg)
    out = inputs.out
    with run_dir.locked(out):
        start = time.perf_counter()
        run = start_sft(cfg, inputs)
        policy, optimizer, state = start_or_resume_sft(run)
        total = total_steps(len(run.examples), cfg.optim)
        bar = progress_bar(total=total, initial=state.global_step, desc="sft", unit="step")
        try:  # the bar closes on the way out, so that an error line starts a line of its own
            with bar, interrupt.deferred_sigterm():
                train_epochs(run, policy, optimizer, state, total, bar)
        except Interrupted as stop:
            stop.where = f"in epoch {state.epoch + 1}, after step {state.global_step}/{total}"
            raise
        save_final(run, policy)
        print(sft_summary(run, state, time.perf_counter() - start))
    return out


def start_sft(cfg: SftConfig, inputs: RunInputs) -> SftRun:
    """Check what can fail fast (run directory, model, vocab, memory), then read the examples and
    write run.json. The caller holds the run directory's lock; fresh, overwrite and resume follow
    `ropo train`'s rules (training_run.identify_run)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("ropo sft runs in one process; start it without torchrun")
    out, model_dir = inputs.out, inputs.model_dir
    data_file, data_format = inputs.data_file, inputs.data_format
    torch.manual_seed(cfg.run.seed)
    device = pick_device(cfg.model.device)
    if not cfg.run.resume:
        run_dir.check_fresh(out, cfg.run.overwrite, cfg.command)
    tokenizer = policy_tokenizer(cfg, model_dir, device)
    identity = identify_run(out, cfg.run, run_dir.input_fingerprints(model_dir, data_file))
    examples, report = prepare_examples(cfg, model_dir, tokenizer, data_file, data_format)
    summary = f"{data_file}: {report.summary()}"
    print(summary)
    rows = ([example.id, example.prompt_ids, example.response_ids] for example in examples)
    write_run_info(out, identity, cfg.to_flat_dict(), fingerprint_rows(rows), summary)
    fields = {"examples": examples, "data_summary": summary}
    return SftRun.start(cfg, out, identity, model_dir, tokenizer, device, **fields)


def prepare_examples(
    cfg: SftConfig, model_dir: Path, tokenizer: Tokenizer, data_file: Path, data_format: str
) -> tuple[list[SftExample], DataReport]:
    """The examples of the data file, rendered with the chat format `template` picks for the
    model, tokenised; and the report of what was skipped."""
    data = cfg.data
    chat = load_chat_format(model_dir, data.template, tokenizer)
    demonstrations, report = load_demonstrations(data_file, data_format, chat, data.strict_data)
    examples, report = tokenize_demonstrations(
        demonstrations, tokenizer, data.max_length, report, chat
    )
    if not examples:
        raise ValueError(f"{data_file}: no usable examples ({report.summary()})")
    return examples, report


def start_or_resume_sft(run: SftRun) -> tuple[Transformer, torch.optim.Optimizer, LoopPosition]:
    """A fresh policy from the model directory, or the policy, optimizer and position of the last
    checkpoint (`resume`); metrics lines written after that checkpoint are cut."""
    policy, optimizer, loop = policy_and_optimizer(run)
    metrics = run.out / "metrics.jsonl"
    if loop is None:
        metrics.unlink(missing_ok=True)
        return policy, optimizer, LoopPosition()
    state = LoopPosition.from_record(loop)
    print(f"resume: {run.identity.checkpoint} (epoch {state.epoch + 1}, step {state.global_step})")
    truncate_jsonl(metrics, lambda record: record["step"] <= state.global_step)
    return policy, optimizer, state


def total_steps(n_examples: int, cfg: SftOptimSettings) -> int:
    """The run's optimizer steps, the schedule's length: `steps`, else `epochs` passes of
    ceil(N / (batch_size * grad_accum)) steps each."""
    return cfg.steps or cfg.epochs * math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))


def train_epochs(
    run: SftRun,
    policy: Transformer,
    optimizer: torch.optim.Optimizer,
    state: LoopPosition,
    total: int,
    bar: tqdm | PlainProgress,
) -> None:
    """Optimizer steps from `state` until `total`: epoch after epoch in step.epoch_steps' seeded
    order (a resumed run replays it), the last epoch cut short where `total` falls inside it.
    A checkpoint after every epoch and every save_every steps; a deferred SIGTERM stops the run
    at the next step boundary."""
    cfg = run.cfg
    while state.global_step < total:
        steps = epoch_steps(run.examples, cfg, 0, state.epoch)
        end = min(len(steps), state.step_in_epoch + total - state.global_step)
        for step_idx in range(state.step_in_epoch, end):
            lr = learning_rate(state.global_step, total, cfg.optim)
            stats = sft_step(policy, optimizer, steps[step_idx], lr, run.step)
            check_step(run, state, stats.skipped, f"epoch {state.epoch + 1}, step {step_idx + 1}")
            state.global_step, state.step_in_epoch = state.global_step + 1, step_idx + 1
            log_step(run.out / "metrics.jsonl", state, stats)
            bar.set_postfix_str(f"epoch {state.epoch + 1}, loss={stats.loss:.4f}")
            bar.update(1)
            if cfg.run.save_every and state.global_step % cfg.run.save_every == 0:
                save(run, f"step-{state.global_step:07d}", policy, optimizer, state)
            if interrupt.pending():
                stop_for_sigterm(run, policy, optimizer, state)
        if end == len(steps):  # the epoch is complete, not cut short by `total`
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            save(run, f"epoch-{state.epoch}", policy, optimizer, state)


def sft_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[list[SftExample]],
    lr: float,
    settings: StepSettings,
) -> SftStepStats:
    """One optimizer step on the mean negative log-likelihood per response token over all the
    step's examples, then AdamW.

    Each micro-batch's summed NLL is divided by the step's total count of response tokens before
    backward, so accumulation gives exactly the gradient of one big batch. A NaN/inf loss or
    gradient norm applies nothing: the gradients are cleared and `skipped` says why.
    """
    n_tokens = sum(len(example.response_ids) for batch in micro_batches for example in batch)
    loss_sum = torch.zeros((), device=settings.device)
    for batch in micro_batches:
        prompts, responses = [e.prompt_ids for e in batch], [e.response_ids for e in batch]
        rows = collate_sequences(prompts, responses, settings.pad_id)
        input_ids, attention_mask, response_mask = (t.to(settings.device) for t in rows)
        with autocast(settings.device, settings.autocast):
            sums, _ = sequence_logps(model, input_ids, attention_mask, response_mask)  # (R,)
        loss = -sums.sum() / n_tokens
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = clip_gradients(model, settings.max_grad_norm)
    loss_value, norm = torch.stack([loss_sum, grad_norm.float()]).tolist()  # one host sync
    if not (math.isfinite(loss_value) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        ids = [example.id for batch in micro_batches for example in batch]
        reason = f"non-finite loss {loss_value} or gradient norm {norm} for examples {ids[:10]}"
        return SftStepStats(math.nan, math.nan, lr, n_tokens, skipped=reason)
    apply_step(optimizer, lr)
    return SftStepStats(loss_value, norm, lr, n_tokens)


def log_step(path: Path, state: LoopPosition, stats: SftStepStats) -> None:
    """A metrics.jsonl line for the step just taken: its loss, gradient norm, learning rate and
    response tokens, or why it was skipped (its numbers are NaN)."""
    record = {"step": state.global_step, "epoch": state.epoch + 1}
    if stats.skipped:
        record["skipped"] = stats.skipped
    else:
        record |= {key: value for key, value in vars(stats).items() if key != "skipped"}
    append_jsonl(path, [record])


def sft_summary(run: SftRun, state: LoopPosition, wall_seconds: float) -> str:
    """The run in a few lines: time, examples, the loss at the first and the last step (from
    metrics.jsonl, so a resumed run counts its whole history) and where the model is."""
    records = read_jsonl(run.out / "metrics.jsonl")
    losses = [record["loss"] for record in records if "loss" in record]
    lines = [
        f"sft finished: {state.global_step} steps, {timedelta(seconds=round(wall_seconds))} wall "
        "time in this process",
        f"examples: {run.data_summary}",
    ]
    if losses:
        lines.append(f"loss per response token: {losses[0]:.4f} at step 1, {losses[-1]:.4f} last")
    if state.n_skipped_nonfinite:
        lines.append(f"skip_nonfinite: {state.n_skipped_nonfinite} steps skipped for NaN/inf")
    final = run.out / "final"
    lines.append(f"written: {final}, {run.out / 'run.json'}, {run.out / 'metrics.jsonl'}")
    lines.append(f"next: ropo train model={final} data=PAIRS.jsonl out=RUN_DIR ...")
    return "\n".join(lines)
