"""What a run fixes before its loop starts and keeps after it: data, policy, resume and final save.

Sits after step.py (StepSettings, the optimizer) and before resample.py and train.py: train.py
calls start_run, start_or_resume and save_final, and saves `checkpoint_state` in every checkpoint.
`ropo sft` (sft.py) shares the parts that do not depend on preference pairs: TrainingRun and
LoopPosition, the policy source checks, the run identity, the policy and its checkpoints, final/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ropo import audit, distributed, run_dir
from ropo.checkpoint import latest_checkpoint, load_adapters, load_checkpoint
from ropo.config import RunConfig, RunDirSettings
from ropo.data import PreferencePair, TokenizedPair, inject_noise, load_pairs, tokenize_pairs
from ropo.distributed import is_main
from ropo.heldout import HeldoutPairs, heldout_inputs, prepare_heldout, split_heldout
from ropo.loss import LOSS_PARAMS, PreferenceLoss, get_loss
from ropo.models import Tokenizer, load_model, load_tokenizer
from ropo.models.chat_format import load_chat_format
from ropo.models.config import read_model_config
from ropo.models.export import TokenizerExport, write_tokenizer_files
from ropo.models.llama import Transformer
from ropo.models.load import checkpoint_dtype, save_weights
from ropo.models.lora import apply_lora, is_adapter, merged_weights
from ropo.models.peft_export import save_peft_adapters
from ropo.presets import resolve_data, resolve_inputs, resolve_model
from ropo.ref_cache import check_reference_model, fingerprint_model_dir, fingerprint_pairs
from ropo.resources import DTYPES, check_fits, check_memory, check_vocab
from ropo.sft_config import SftConfig
from ropo.step import StepSettings, make_optimizer

RunKind = TypeVar("RunKind", bound="TrainingRun")  # TrainingRun.start returns the class it is on


@dataclass
class Dataset:
    """The pairs of a run: text (for export), tokens (for training) and the injected flips."""

    text: list[PreferencePair]
    tokens: list[TokenizedPair]
    flips: dict[str, bool] | None
    summary: str
    heldout: HeldoutPairs | None = None  # eval_data / eval_split: scored, never trained on


@dataclass(frozen=True, kw_only=True)
class TrainingRun:
    """What a training command (`ropo train`, `ropo sft`) fixes before its loop: settings,
    places, the policy's source and tokenizer, and how every step runs."""

    cfg: RunConfig | SftConfig
    out: Path
    identity: run_dir.RunIdentity  # run id (in run.json and every checkpoint), inputs, resume
    model_dir: Path
    tokenizer: Tokenizer
    dtype: torch.dtype
    step: StepSettings
    base_sha256: str = ""  # with LoRA: fingerprint of the frozen base that checkpoints rely on
    # How long each checkpoint write of this process took; on SIGTERM the last one decides
    # whether another fits in the grace period.
    checkpoint_seconds: list[float] = field(default_factory=list)

    @property
    def tokenizer_files(self) -> TokenizerExport:
        """How the run tokenised, written beside saved weights (final/ and checkpoints)."""
        chat = load_chat_format(self.model_dir, self.cfg.data.template, self.tokenizer)
        return TokenizerExport(self.tokenizer, chat)

    @classmethod
    def start(
        cls: type[RunKind],
        cfg: RunConfig | SftConfig,
        out: Path,
        identity: run_dir.RunIdentity,
        model_dir: Path,
        tokenizer: Tokenizer,
        device: torch.device,
        **fields: Any,
    ) -> RunKind:
        """The run, with what follows from the settings alike for every command (weights dtype,
        step settings, the LoRA base's fingerprint); `fields` are the command's own."""
        autocast = DTYPES.get(cfg.model.autocast)
        return cls(
            cfg=cfg,
            out=out,
            identity=identity,
            model_dir=model_dir,
            tokenizer=tokenizer,
            dtype=DTYPES[cfg.model.dtype],
            step=StepSettings(tokenizer.pad_id, cfg.optim.max_grad_norm, device, autocast),
            base_sha256=fingerprint_model_dir(model_dir) if cfg.model.lora_rank else "",
            **fields,
        )


@dataclass(frozen=True, kw_only=True)
class Run(TrainingRun):
    """A `ropo train` run: also its pairs, the loss and the frozen reference's directory."""

    data: Dataset
    loss_fn: PreferenceLoss
    reference_dir: Path  # the model directory unless reference= names another


@dataclass
class LoopPosition:
    """Where a training loop is, in optimizer steps; saved in every checkpoint so that `resume`
    continues exactly. `ropo sft` keeps this; `ropo train` adds its rounds (LoopState)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    n_skipped_nonfinite: int = 0  # steps not applied for a NaN/inf loss or gradient


@dataclass
class LoopState(LoopPosition):
    """Where ROPO's loop is: the position in steps, the round, the kept and sampled pairs."""

    round_idx: int = 0
    kept_ids: list[str] | None = None  # None: every pair (round 0)
    # The global step where the learning-rate schedule began: 0, or where last_round=restart
    # started its fresh policy (step.planned_steps).
    schedule_start: int = 0
    sampled: list[dict[str, Any]] = field(default_factory=list)  # rejection-sampled pairs
    # Held-out metrics of the policy before round 1, written with round 1's metrics line: kept
    # here so that a run resumed within round 1 writes the same line.
    eval_start: dict[str, float] = field(default_factory=dict)


def start_run(cfg: RunConfig) -> Run:
    """Check what can fail fast (run directory, paths, vocab, memory), then read the data.

    The caller holds the run directory's lock (run_dir.locked). A fresh run needs an empty
    directory (or overwrite=true, which empties it once the model and tokenizer check out); a
    resume first checks that its model, tokenizer and data are the ones run.json recorded.
    """
    out = Path(cfg.run.resume or cfg.run.out)
    torch.manual_seed(cfg.run.seed)
    device = distributed.init(cfg)  # joins the process group under torchrun
    if not cfg.run.resume and is_main():
        run_dir.check_fresh(out, cfg.run.overwrite, cfg.command)
    model_dir, tokenizer = policy_source(cfg, device)
    reference_dir = reference_model_dir(cfg, model_dir)
    loss_fn = get_loss(cfg.loss.loss, beta=cfg.loss.beta, **loss_params(cfg))
    data_file, _ = resolve_data(cfg.data.data, cfg.data.format)
    inputs = run_dir.input_fingerprints(model_dir, data_file, reference_dir) | heldout_inputs(cfg)
    identity = identify_run(out, cfg.run, inputs)
    data = prepare_data(cfg, tokenizer, out)
    if is_main():
        print(data.summary)
        eval_ids = data.heldout.split_ids if data.heldout else []
        data_fingerprint = fingerprint_pairs(data.tokens)
        audit.write_run_info(
            out, identity, cfg.to_flat_dict(), data_fingerprint, data.summary, eval_ids
        )
    fields = {"data": data, "loss_fn": loss_fn, "reference_dir": reference_dir}
    return Run.start(cfg, out, identity, model_dir, tokenizer, device, **fields)


def policy_source(cfg: RunConfig | SftConfig, device: torch.device) -> tuple[Path, Tokenizer]:
    """The policy's model directory and tokenizer, checked to belong together and to fit
    (positions, LoRA rank, memory on `device`) before any weight is read."""
    # Weights and data together: a run missing both says so at once, not one per attempt.
    model_dir, _, _ = resolve_inputs(cfg.model.model, cfg.data.data, cfg.data.format)
    tokenizer = load_tokenizer(model_dir)
    config = read_model_config(model_dir)  # read once; these checks fail in a second
    check_vocab(tokenizer, config, model_dir)
    check_fits(config, cfg, model_dir)
    memory = check_memory(config, cfg, device, model_dir, distributed.world_size())
    if is_main():
        print(memory)
    return model_dir, tokenizer


def reference_model_dir(cfg: RunConfig, model_dir: Path) -> Path:
    """The frozen reference's model directory: `reference`, checked to be the policy's network
    with the policy's tokenizer, or (reference='') the policy's own starting point."""
    if not cfg.model.reference:
        return model_dir
    try:
        reference_dir = resolve_model(cfg.model.reference)
        if reference_dir.resolve() != model_dir.resolve():
            check_reference_model(model_dir, reference_dir)
    except (FileNotFoundError, ValueError) as err:  # e.g. a directory without config.json
        raise type(err)(f"config key 'reference': {err}") from None
    return reference_dir


def identify_run(
    out: Path, settings: RunDirSettings, inputs: dict[str, Any]
) -> run_dir.RunIdentity:
    """The run's id, the fingerprints of its `inputs` and, for a resume, its checkpoint.

    A fresh run gets a new id (and with overwrite=true an emptied directory, now that its model
    and tokenizer have been checked). A resume keeps the id of run.json after checking that every
    input is still the one recorded there and finding the newest checkpoint of this run that
    verifies: every refusal comes before anything in the directory is written.
    """
    if not settings.resume:
        if is_main() and settings.overwrite:
            run_dir.clear(out)
        return run_dir.RunIdentity(run_dir.new_run_id(), inputs)
    info = run_dir.read_run_info(out)
    run_dir.check_inputs_unchanged(out / "run.json", info["inputs"], inputs)
    checkpoint = latest_checkpoint(out, info["run_id"])
    return run_dir.RunIdentity(info["run_id"], inputs, info, checkpoint)


def loss_params(cfg: RunConfig) -> dict[str, float]:
    """The extra parameters the chosen loss takes (alpha for ropo, epsilon for cdpo/rdpo)."""
    return {name: getattr(cfg.loss, name) for name in LOSS_PARAMS[cfg.loss.loss]}


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer, out: Path) -> Dataset:
    """Load, inject noise (recording the flip mask in <out>/flips.json) and tokenise."""
    path, data_format = resolve_data(cfg.data.data, cfg.data.format)
    model_dir = resolve_model(cfg.model.model)
    chat = load_chat_format(model_dir, cfg.data.template, tokenizer)
    pairs, report = load_pairs(path, data_format, chat, strict=cfg.data.strict_data)
    if cfg.data.max_pairs and len(pairs) > cfg.data.max_pairs:
        report.skipped["beyond_max_pairs"] = len(pairs) - cfg.data.max_pairs  # counted, not silent
        pairs = pairs[: cfg.data.max_pairs]
    pairs, split_off = split_heldout(pairs, cfg.heldout.eval_split, cfg.run.seed)  # before noise
    if split_off:
        report.skipped["held_out_for_eval"] = len(split_off)  # counted, not silent
    flips = None
    if cfg.data.noise > 0:
        pairs, flips = inject_noise(pairs, cfg.data.noise, cfg.run.seed)
        if is_main():
            (out / "flips.json").write_text(json.dumps(flips))
    tokens, report = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, report, chat)
    if not tokens:
        raise ValueError(f"{path}: no usable pairs left ({report.summary()})")
    if chat.note and is_main():
        print(chat.note)
    used = {pair.id for pair in tokens}
    text = [pair for pair in pairs if pair.id in used]
    flips = {i: flips[i] for i in used} if flips is not None else None
    noise = f", {sum(flips.values())} labels flipped (noise={cfg.data.noise})" if flips else ""
    heldout = prepare_heldout(cfg, tokenizer, chat, split_off)
    summary = f"{path}: {report.summary()}{noise}" + (f"\n{heldout.summary}" if heldout else "")
    return Dataset(text, tokens, flips, summary, heldout)


def start_or_resume(run: Run) -> tuple[Transformer, torch.optim.Optimizer, LoopState]:
    """A fresh policy from the model directory, or model, optimizer and state of the last
    checkpoint (`resume`); audit lines written after that checkpoint are cut."""
    out = run.out
    policy, optimizer, loop = policy_and_optimizer(run)
    if loop is None:
        if is_main():
            for name in ("pairs.jsonl", "metrics.jsonl", "train_log.jsonl", "sampled_pairs.jsonl"):
                (out / name).unlink(missing_ok=True)
        return policy, optimizer, LoopState()
    state = LoopState(**loop)
    if is_main():
        print(
            f"resume: {run.identity.checkpoint} (round {state.round_idx + 1}, "
            f"epoch {state.epoch + 1}, step {state.global_step})"
        )
        # Rounds in the files count from 1; state.round_idx counts the rounds already done.
        audit.truncate_jsonl(out / "pairs.jsonl", lambda r: r["round"] <= state.round_idx)
        audit.truncate_jsonl(out / "metrics.jsonl", lambda r: r["round"] <= state.round_idx)
        audit.truncate_jsonl(out / "train_log.jsonl", lambda r: r["step"] <= state.global_step)
        audit.truncate_jsonl(out / "sampled_pairs.jsonl", lambda r: r["round"] <= state.round_idx)
    return policy, optimizer, state


def policy_and_optimizer(
    run: TrainingRun,
) -> tuple[Transformer, torch.optim.Optimizer, dict[str, Any] | None]:
    """A fresh policy and AdamW with None, or the policy, AdamW and saved loop position (a dict)
    of the checkpoint the run resumes from."""
    optimizer_for = lambda model: make_optimizer(model, run.cfg.optim)  # noqa: E731
    checkpoint = run.identity.checkpoint
    if checkpoint is None:
        if run.cfg.run.resume and is_main():
            print(f"resume: no checkpoint in {run.out} yet, starting from the beginning")
        policy = build_policy(run)
        return policy, optimizer_for(policy), None
    policy, optimizer, saved = load_checkpoint(
        checkpoint, lambda path: build_policy(run, path), optimizer_for, run.step.device
    )
    return policy, optimizer, saved["loop"]


def build_policy(run: TrainingRun, checkpoint: Path | None = None) -> Transformer:
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


def checkpoint_state(state: LoopPosition, run: TrainingRun) -> dict[str, Any]:
    """The run state a checkpoint's state.json holds: loop counters and the resolved config."""
    saved = {
        "loop": vars(state).copy(),
        "config": run.cfg.to_flat_dict(),
        "run_id": run.identity.run_id,
    }
    if run.base_sha256:  # a LoRA checkpoint holds adapters for exactly this base model
        saved["base_model_sha256"] = run.base_sha256
    return saved


def save_final(run: TrainingRun, policy: Transformer) -> None:
    """<out>/final: the policy in plain Hugging Face layout (LoRA merged) in `save_dtype` (default:
    the input checkpoint's dtype), the tokenizer files that say how the run tokenised, and with
    LoRA the adapters in PEFT's layout in final/adapter (a subfolder: transformers would take an
    adapter_config.json in final/ itself for an adapter to load onto the base model)."""
    weights = distributed.gather_weights(policy)  # under FSDP every rank takes part
    if not is_main():
        return
    cfg, final = run.cfg.model, run.out / "final"
    if cfg.lora_rank:
        adapters = {name: w for name, w in weights.items() if is_adapter(name)}
        rank, alpha = cfg.lora_rank, cfg.lora_alpha
        save_peft_adapters(final / "adapter", adapters, rank, alpha, run.model_dir)
        weights = merged_weights(weights, alpha / rank)
    dtype = DTYPES[cfg.save_dtype] if cfg.save_dtype else checkpoint_dtype(run.model_dir)
    # Cast on the way to the CPU, one tensor at a time: no second copy of the model on the GPU.
    save_weights(policy.config, {name: w.to("cpu", dtype) for name, w in weights.items()}, final)
    write_tokenizer_files(final, run.tokenizer_files, policy.config.max_position_embeddings)
