"""The ROPO training loop: the one module that wires every stage together.

    config -> tokenizer and data (+ injected noise) -> policy and reference log-prob cache
    for each round:  train on the kept pairs (+ sampled pairs) with the chosen loss  (theta-step)
                     score every pair with the policy, keep the lowest-loss (1 - rho) N  (w-step)
                     write the audit; optionally sample new pairs for dropped prompts
`loss=dpo rounds=1 rho=0` is plain DPO through the same code. Under torchrun every process runs
this same loop; distributed.py shards the model, the steps and the scoring, and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ropo import audit, distributed
from ropo.checkpoint import latest_checkpoint, load_adapters, load_checkpoint, save_checkpoint
from ropo.config import OptimSettings, RunConfig
from ropo.data import PreferencePair, TokenizedPair, inject_noise, load_pairs, tokenize_pairs
from ropo.distributed import is_main, rank_share, sum_over_ranks
from ropo.faults import maybe_crash
from ropo.filter.rejection import rejection_sample
from ropo.filter.weights import DropDecision, select_drops
from ropo.logps import PairLogps, collate_pairs, response_logps
from ropo.loss import LOSS_PARAMS, PreferenceLoss, get_loss
from ropo.models import Tokenizer, load_model, load_tokenizer
from ropo.models.llama import ModelConfig, Transformer
from ropo.models.load import save_weights
from ropo.models.lora import apply_lora, merged_weights
from ropo.presets import resolve_data, resolve_model
from ropo.ref_cache import RefLogps, fingerprint_model_dir, fingerprint_pairs, reference_logps
from ropo.resources import check_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Dataset:
    """The pairs of a run: text (for export), tokens (for training) and the injected flips."""

    text: list[PreferencePair]
    tokens: list[TokenizedPair]
    flips: dict[str, bool] | None
    summary: str


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint so that `resume` continues exactly."""

    round_idx: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    kept_ids: list[str] | None = None  # None: every pair (round 0)
    sampled: list[dict[str, Any]] = field(default_factory=list)  # rejection-sampled pairs
    n_skipped_nonfinite: int = 0  # steps not applied for a NaN/inf loss or gradient


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


@dataclass(frozen=True)
class Run:
    """What a run fixes before training starts: settings, places, data and the loss."""

    cfg: RunConfig
    out: Path
    model_dir: Path
    tokenizer: Tokenizer
    data: Dataset
    loss_fn: PreferenceLoss
    dtype: torch.dtype
    step: StepSettings
    base_sha256: str = ""  # with LoRA: fingerprint of the frozen base that checkpoints rely on


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


def start_run(cfg: RunConfig) -> Run:
    """Check what can fail fast (paths, vocab, memory, loss), then read the data."""
    out = Path(cfg.run.resume or cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    device = distributed.init(cfg)  # joins the process group under torchrun
    dtype = DTYPES[cfg.model.dtype]
    model_dir = resolve_model(cfg.model.model)
    tokenizer = load_tokenizer(model_dir)
    check_vocab(tokenizer, model_dir)  # these checks fail in a second, before any slow work
    memory = check_memory(model_dir, cfg, device, distributed.world_size())
    if is_main():
        print(memory)
    loss_fn = get_loss(cfg.loss.loss, beta=cfg.loss.beta, **loss_params(cfg))
    data = prepare_data(cfg, tokenizer, out)
    if is_main():
        print(data.summary)
        audit.write_run_info(out, cfg.to_flat_dict(), fingerprint_pairs(data.tokens), data.summary)
    step = StepSettings(
        tokenizer.pad_id, cfg.optim.max_grad_norm, device, DTYPES.get(cfg.model.autocast)
    )
    base_sha256 = fingerprint_model_dir(model_dir) if cfg.model.lora_rank else ""
    return Run(cfg, out, model_dir, tokenizer, data, loss_fn, dtype, step, base_sha256)


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


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer, out: Path) -> Dataset:
    """Load, inject noise (recording the flip mask in <out>/flips.json) and tokenise."""
    path, data_format = resolve_data(cfg.data.data, cfg.data.format)
    pairs, report = load_pairs(path, format=data_format, template=cfg.data.template)
    if cfg.data.max_pairs and len(pairs) > cfg.data.max_pairs:
        report.skipped["beyond_max_pairs"] = len(pairs) - cfg.data.max_pairs  # counted, not silent
        pairs = pairs[: cfg.data.max_pairs]
    flips = None
    if cfg.data.noise > 0:
        pairs, flips = inject_noise(pairs, cfg.data.noise, cfg.run.seed)
        if is_main():
            (out / "flips.json").write_text(json.dumps(flips))
    tokens, report = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, report)
    if not tokens:
        raise ValueError(f"{path}: no usable pairs left ({report.summary()})")
    used = {pair.id for pair in tokens}
    text = [pair for pair in pairs if pair.id in used]
    flips = {i: flips[i] for i in used} if flips is not None else None
    noise = f", {sum(flips.values())} labels flipped (noise={cfg.data.noise})" if flips else ""
    return Dataset(text, tokens, flips, f"{path}: {report.summary()}{noise}")


def loss_params(cfg: RunConfig) -> dict[str, float]:
    """The extra parameters the chosen loss takes (alpha for ropo, epsilon for cdpo/rdpo)."""
    return {name: getattr(cfg.loss, name) for name in LOSS_PARAMS[cfg.loss.loss]}


def start_or_resume(run: Run) -> tuple[Transformer, torch.optim.Optimizer, LoopState]:
    """A fresh policy from the model directory, or model, optimizer and state of the last
    checkpoint (`resume`); audit lines written after that checkpoint are cut."""
    cfg, out = run.cfg, run.out
    optimizer_for = lambda model: make_optimizer(model, cfg.optim)  # noqa: E731
    checkpoint = latest_checkpoint(out) if cfg.run.resume else None
    if checkpoint is None:
        if cfg.run.resume and is_main():
            print(f"resume: no checkpoint in {out} yet, starting from the beginning")
        policy = build_policy(run)
        if is_main():
            for name in ("pairs.jsonl", "metrics.jsonl", "train_log.jsonl", "sampled_pairs.jsonl"):
                (out / name).unlink(missing_ok=True)
        return policy, optimizer_for(policy), LoopState()
    policy, optimizer, saved = load_checkpoint(
        checkpoint, lambda path: build_policy(run, path), optimizer_for, run.step.device
    )
    state = LoopState(**saved["loop"])
    if is_main():
        print(
            f"resume: {checkpoint} (round {state.round_idx + 1}, epoch {state.epoch + 1}, "
            f"step {state.global_step})"
        )
        audit.truncate_jsonl(out / "pairs.jsonl", lambda r: r["round"] < state.round_idx)
        audit.truncate_jsonl(out / "metrics.jsonl", lambda r: r["round"] < state.round_idx)
        audit.truncate_jsonl(out / "train_log.jsonl", lambda r: r["step"] <= state.global_step)
        audit.truncate_jsonl(out / "sampled_pairs.jsonl", lambda r: r["round"] < state.round_idx)
    return policy, optimizer, state


def build_policy(run: Run, checkpoint: Path | None = None) -> Transformer:
    """The policy to train: weights of the model directory or of `checkpoint`, LoRA adapters
    when lora_rank > 0 (a checkpoint then holds only them), sharded with FSDP under torchrun."""
    cfg = run.cfg.model
    source = checkpoint if checkpoint is not None and not cfg.lora_rank else run.model_dir
    policy = load_model(source, dtype=run.dtype, device=run.step.device)
    if cfg.lora_rank:
        targets = cfg.lora_targets.split(",")
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, targets, seed=run.cfg.run.seed)
        if checkpoint is not None:
            load_adapters(policy, checkpoint, run.base_sha256)
    policy.activation_checkpointing = cfg.activation_checkpointing
    policy.train()
    return distributed.shard_model(policy)


def checkpoint_state(state: LoopState, run: Run) -> dict[str, Any]:
    saved = {"loop": vars(state).copy(), "config": run.cfg.to_flat_dict()}
    if run.base_sha256:  # a LoRA checkpoint holds adapters for exactly this base model
        saved["base_model_sha256"] = run.base_sha256
    return saved


def save_final(run: Run, policy: Transformer) -> None:
    """<out>/final: the policy in plain Hugging Face layout (LoRA merged) and the tokenizer."""
    weights = distributed.gather_weights(policy)  # under FSDP every rank takes part
    if not is_main():
        return
    if run.cfg.model.lora_rank:
        weights = merged_weights(weights, run.cfg.model.lora_alpha / run.cfg.model.lora_rank)
    save_weights(policy.config, weights, run.out / "final")
    shutil.copy(run.model_dir / "tokenizer.model", run.out / "final" / "tokenizer.model")


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


def planned_steps(n_pairs: int, cfg: RunConfig) -> int:
    """Optimizer steps if every round trained on all N pairs: the schedule's length.

    Later rounds train on (1 - rho) N kept pairs plus at most rho N sampled ones, so the real
    count is at most this; the decay then ends slightly above zero, never past it.
    """
    pairs_per_step = cfg.optim.batch_size * cfg.optim.grad_accum
    return cfg.filter.rounds * cfg.optim.epochs * math.ceil(n_pairs / pairs_per_step)


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
    pairs: list[TokenizedPair], cfg: RunConfig, round_idx: int, epoch: int
) -> list[list[list[TokenizedPair]]]:
    """The epoch as optimizer steps, each a list of micro-batches of pairs.

    The order is a permutation seeded by (seed, round, epoch) alone, so a resumed run replays the
    same batches; the last step may be short.
    """
    generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + round_idx * 1009 + epoch)
    order = torch.randperm(len(pairs), generator=generator).tolist()
    size, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    micro = [[pairs[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
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
    for group in optimizer.param_groups:
        group["lr"] = lr
    maybe_crash("step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_sum / n_pairs, correct / n_pairs, margin_sum / n_pairs, norm, lr)


def skipped_step(optimizer: torch.optim.Optimizer, reason: str, lr: float) -> StepStats:
    """The stats of a step that applied nothing; its gradients are cleared here."""
    optimizer.zero_grad(set_to_none=True)
    nan = float("nan")
    return StepStats(nan, nan, nan, nan, lr, skipped=reason)


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
    margins = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    return losses, margins.detach()


def clip_gradients(model: Transformer, max_grad_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping, as a 0-d tensor (NaN/inf: the caller checks)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    return distributed.plain_tensor(norm)  # under FSDP a DTensor over the ranks' shards


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


def sample_replacements(
    run: Run, policy: Transformer, decision: DropDecision, round_idx: int
) -> list[dict[str, Any]]:
    """Rejection-sampled pairs for the prompts of dropped pairs, as JSON-ready records.

    The reference model is loaded only for this and freed again: it scores the new responses.
    """
    cfg, tokenizer, device = run.cfg, run.tokenizer, run.step.device
    dropped = set(decision.dropped_ids)
    reference = load_model(run.model_dir, dtype=run.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed * 7919 + round_idx)
    result = rejection_sample(
        policy,
        reference,
        [p for p in run.data.tokens if p.id in dropped],
        round_idx,
        cfg.filter.rs_k,
        cfg.loss.beta,
        cfg.filter.rs_temperature,
        cfg.filter.rs_top_p,
        cfg.filter.rs_max_new_tokens,
        tokenizer.eos_id,
        tokenizer.pad_id,
        generator,
        vocab_limit=tokenizer.vocab_size,
    )
    del reference
    policy.train()
    records = []
    for i, pair in enumerate(result.pairs):
        records.append(
            {
                "id": pair.id,
                "round": round_idx,
                "prompt_ids": list(pair.prompt_ids),
                "chosen_ids": list(pair.chosen_ids),
                "rejected_ids": list(pair.rejected_ids),
                "ref_chosen_logp": result.reference.chosen[i].item(),
                "ref_rejected_logp": result.reference.rejected[i].item(),
                "chosen": tokenizer.decode(list(pair.chosen_ids)),
                "rejected": tokenizer.decode(list(pair.rejected_ids)),
            }
        )
    audit.append_jsonl(run.out / "sampled_pairs.jsonl", records)
    print(
        f"rejection sampling: {len(records)} new pairs for {len(dropped)} dropped pairs "
        f"(skipped: {result.skipped})"
    )
    return records


def sampled_pair(record: dict[str, Any]) -> TokenizedPair:
    return TokenizedPair(
        record["id"],
        tuple(record["prompt_ids"]),
        tuple(record["chosen_ids"]),
        tuple(record["rejected_ids"]),
    )


def sampled_ref_logps(records: list[dict[str, Any]]) -> RefLogps:
    """Reference log-probs of sampled pairs (computed when they were sampled)."""
    column = lambda key: torch.tensor([float(r[key]) for r in records])  # noqa: E731
    count = lambda key: torch.tensor([float(len(r[key])) for r in records])  # noqa: E731
    logps = PairLogps(
        column("ref_chosen_logp"),
        column("ref_rejected_logp"),
        count("chosen_ids"),
        count("rejected_ids"),
    )
    return RefLogps([r["id"] for r in records], logps, "sampled")


def check_vocab(tokenizer: Tokenizer, model_dir: Path) -> None:
    """Raise ValueError if the tokenizer has ids the embedding lacks; reads only config.json, which
    from_hf also checks for settings we do not support (e.g. rope_scaling)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()), source=str(config_file))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{model_dir}/tokenizer.model has {tokenizer.vocab_size} pieces but the "
            f"model's embedding has {config.vocab_size} rows "
            f"({model_dir}/config.json vocab_size): they do not belong together"
        )


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
