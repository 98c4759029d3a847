"""What `ropo train` fixes before its loop: the pairs (held out, noised, tokenised), the loss, the
reference log-probs the loop reads, and the loop state, fresh or resumed from a checkpoint.

start_run first checks what can fail in a second (run directory, model, tokenizer, memory), then
reads the data. The policy itself is policy.py's; the run's identity and the position its
checkpoints save are training_run.py's. Sits after them and after the sampling stage (LoopState
carries the sampled pairs), just before train.py, which alone calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ropo import distributed, run_dir
from ropo.config import RunConfig
from ropo.data import PreferencePair, TokenizedPair, inject_noise, load_pairs, tokenize_pairs
from ropo.distributed import is_main
from ropo.filter.rejection import SampledPair, SamplingSettings
from ropo.fingerprints import file_sha256, fingerprint_pairs
from ropo.heldout import HeldoutPairs, heldout_inputs, prepare_heldout, split_heldout
from ropo.jsonl import truncate_jsonl
from ropo.loss import PreferenceLoss, get_loss
from ropo.models import Tokenizer
from ropo.models.chat_format import load_chat_format
from ropo.models.config import read_model_config
from ropo.policy import Learner, policy_and_optimizer, policy_tokenizer
from ropo.presets import resolve_model
from ropo.ref_cache import RefLogps, reference_logps
from ropo.run_info import write_run_info
from ropo.step import autocast, round_epochs
from ropo.training_run import LoopPosition, RunInputs, TrainingRun, identify_run


@dataclass
class Dataset:
    """The pairs of a run: text (for export), tokens (for training) and the injected flips."""

    text: list[PreferencePair]
    tokens: list[TokenizedPair]
    flips: dict[str, bool] | None
    summary: str
    heldout: HeldoutPairs | None = None  # eval_data / eval_split: scored, never trained on


@dataclass(frozen=True, kw_only=True)
class Run(TrainingRun):
    """A `ropo train` run: also its pairs, the loss, the frozen reference's directory and how
    rejection sampling (if on) draws new pairs."""

    data: Dataset
    loss_fn: PreferenceLoss
    reference_dir: Path  # the model directory unless reference= names another
    sampling: SamplingSettings


@dataclass
class LoopState(LoopPosition):
    """Where ROPO's loop is: the position in steps, the round, the kept and sampled pairs."""

    round_idx: int = 0
    kept_ids: list[str] | None = None  # None: every pair (round 0)
    # The global step where the learning-rate schedule began: 0, or where last_round=restart
    # started its fresh policy (step.planned_steps).
    schedule_start: int = 0
    sampled: list[SampledPair] = field(default_factory=list)  # trained on in this round
    # Held-out metrics of the policy before round 1, written with round 1's metrics line: kept
    # here so that a run resumed within round 1 writes the same line.
    eval_start: dict[str, float] = field(default_factory=dict)

    def position(self, cfg: RunConfig) -> str:
        """Where the loop stands, in words (1-based, as on the progress bars)."""
        where = f"round {self.round_idx + 1}/{cfg.filter.rounds}"
        if self.epoch >= round_epochs(cfg, self.round_idx):
            where = f"at the end of {where} (scoring or sampling)"
            return f"{where}, after global step {self.global_step}"
        return f"in {where}, epoch {self.epoch + 1}, after global step {self.global_step}"

    def to_record(self) -> dict[str, Any]:
        """The state as JSON-ready values: the "loop" of a checkpoint's state.json."""
        return super().to_record() | {"sampled": [pair.to_record() for pair in self.sampled]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LoopState:
        """The state a checkpoint saved with to_record."""
        sampled = [SampledPair.from_record(pair) for pair in record.get("sampled", [])]
        return cls(**(record | {"sampled": sampled}))


def start_run(cfg: RunConfig, inputs: RunInputs) -> Run:
    """Check what can fail fast (run directory, paths, vocab, memory), then read the data.

    The caller holds the run directory's lock (run_dir.locked). A fresh run needs an empty
    directory (or overwrite=true, which empties it once the model and tokenizer check out); a
    resume first checks that its model, tokenizer and data are the ones run.json recorded.
    """
    out, model_dir = inputs.out, inputs.model_dir
    torch.manual_seed(cfg.run.seed)
    device = distributed.init(cfg)  # joins the process group under torchrun
    if not cfg.run.resume and is_main():
        run_dir.check_fresh(out, cfg.run.overwrite, cfg.command)
    tokenizer = policy_tokenizer(cfg, model_dir, device)
    reference_dir = reference_model_dir(cfg, model_dir)
    loss_fn = get_loss(cfg.loss.loss, beta=cfg.loss.beta, **loss_params(cfg))
    fingerprints = run_dir.input_fingerprints(model_dir, inputs.data_file, reference_dir)
    identity = identify_run(out, cfg.run, fingerprints | heldout_inputs(cfg))
    data = prepare_data(cfg, tokenizer, inputs)
    if is_main():
        print(data.summary)
        eval_ids = data.heldout.split_ids if data.heldout else []
        data_fingerprint = fingerprint_pairs(data.tokens)
        write_run_info(out, identity, cfg.to_flat_dict(), data_fingerprint, data.summary, eval_ids)
    fields = {"data": data, "loss_fn": loss_fn, "reference_dir": reference_dir}
    fields["sampling"] = sampling_settings(cfg)
    return Run.start(cfg, out, identity, model_dir, tokenizer, device, **fields)


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


def check_reference_model(model_dir: Path, reference_dir: Path) -> None:
    """ValueError unless the reference in `reference_dir` can score the policy's token ids: its
    config.json describes the policy's network (architecture, sizes, vocabulary) and any
    tokenizer file both directories have is the same file. Errors name both directories."""
    ours, theirs = read_model_config(model_dir).to_hf(), read_model_config(reference_dir).to_hf()
    differing = [key for key in ours if ours[key] != theirs.get(key)]
    if differing:
        shown = "; ".join(
            f"{key} = {theirs.get(key)!r} there, {ours[key]!r} in the policy's"
            for key in differing[:3]
        )
        raise ValueError(
            f"config key 'reference': {reference_dir}/config.json is not the network of the "
            f"policy ({model_dir}/config.json): {shown}; the reference must have the policy's "
            "architecture and vocabulary"
        )
    for name in ("tokenizer.model", "tokenizer.json"):
        policy_file, reference_file = model_dir / name, reference_dir / name
        both = policy_file.is_file() and reference_file.is_file()
        if both and file_sha256(policy_file) != file_sha256(reference_file):
            raise ValueError(
                f"config key 'reference': {reference_file} differs from the policy's "
                f"{policy_file}: the reference scores the policy's token ids, so it needs the "
                "same tokenizer"
            )


def sampling_settings(cfg: RunConfig) -> SamplingSettings:
    """How rejection sampling draws and picks: the rs_* keys, beta and the run's seed."""
    return SamplingSettings(
        k=cfg.filter.rs_k,
        beta=cfg.loss.beta,
        temperature=cfg.filter.rs_temperature,
        top_p=cfg.filter.rs_top_p,
        max_new_tokens=cfg.filter.rs_max_new_tokens,
        pair_rule=cfg.filter.rs_pair_rule,
        seed=cfg.run.seed,
    )


def loss_params(cfg: RunConfig) -> dict[str, float]:
    """The extra parameters the chosen loss takes (alpha for ropo, epsilon for cdpo/rdpo)."""
    given = {"alpha": cfg.loss.alpha, "label_smoothing": cfg.loss.label_smoothing}
    return {name: given[name] for name in get_loss(cfg.loss.loss).params}


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer, inputs: RunInputs) -> Dataset:
    """Load, inject noise (recording the flip mask in <out>/flips.json) and tokenise."""
    chat = load_chat_format(inputs.model_dir, cfg.data.template, tokenizer)
    pairs, report = load_pairs(
        inputs.data_file, inputs.data_format, chat, strict=cfg.data.strict_data
    )
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
            (inputs.out / "flips.json").write_text(json.dumps(flips))
    tokens, report = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, report, chat)
    if not tokens:
        raise ValueError(f"{inputs.data_file}: no usable pairs left ({report.summary()})")
    if chat.note and is_main():
        print(chat.note)
    used = {pair.id for pair in tokens}
    text = [pair for pair in pairs if pair.id in used]
    flips = {i: flips[i] for i in used} if flips is not None else None
    noise = f", {sum(flips.values())} labels flipped (noise={cfg.data.noise})" if flips else ""
    heldout = prepare_heldout(cfg, tokenizer, chat, split_off)
    summary = f"{inputs.data_file}: {report.summary()}{noise}" + (
        f"\n{heldout.summary}" if heldout else ""
    )
    return Dataset(text, tokens, flips, summary, heldout)


def start_or_resume(run: Run) -> tuple[Learner, LoopState]:
    """A fresh policy from the model directory, or model, optimizer and state of the last
    checkpoint (`resume`); audit lines written after that checkpoint are cut."""
    out = run.out
    policy, optimizer, loop = policy_and_optimizer(run)
    learner = Learner(policy, optimizer)
    del policy, optimizer  # the learner holds the only references: a restart frees them
    if loop is None:
        if is_main():
            for name in ("pairs.jsonl", "metrics.jsonl", "train_log.jsonl", "sampled_pairs.jsonl"):
                (out / name).unlink(missing_ok=True)
        return learner, LoopState()
    state = LoopState.from_record(loop)
    if is_main():
        print(
            f"resume: {run.identity.checkpoint} (round {state.round_idx + 1}, "
            f"epoch {state.epoch + 1}, step {state.global_step})"
        )
        # Rounds in the files count from 1; state.round_idx counts the rounds already done.
        truncate_jsonl(out / "pairs.jsonl", lambda r: r["round"] <= state.round_idx)
        truncate_jsonl(out / "metrics.jsonl", lambda r: r["round"] <= state.round_idx)
        truncate_jsonl(out / "train_log.jsonl", lambda r: r["step"] <= state.global_step)
        truncate_jsonl(out / "sampled_pairs.jsonl", lambda r: r["round"] <= state.round_idx)
    return learner, state


def reference(run: Run, pairs: list[TokenizedPair]) -> RefLogps:
    """Reference log-probs of `pairs` (training or held-out) under the run's reference model
    (`reference`, else the policy's starting point): read from the cache, or computed once."""
    # Several processes share the reference scoring; one reads or fills the cache alone.
    several = distributed.world_size() > 1
    with autocast(run.step.device, run.step.autocast):
        return (distributed.shared_reference_logps if several else reference_logps)(
            run.reference_dir,
            pairs,
            run.cfg.run.cache_dir or run.out / "cache",
            run.cfg.optim.batch_size * 2,
            run.tokenizer.pad_id,
            run.dtype,
            run.step.device,
        )
