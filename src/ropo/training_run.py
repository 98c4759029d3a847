"""A training command's run: its settings, directory and identity (new, or resumed from a
checkpoint), and where its loop stands, which every checkpoint saves.

Shared by the two training loops, train.py (`ropo train`) and sft.py (`ropo sft`). Sits after
step.py (StepSettings) and checkpoint.py; policy.py, saving.py and run_setup.py build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ropo import run_dir
from ropo.checkpoint import latest_checkpoint
from ropo.config import RunConfig
from ropo.config_machinery import RunDirSettings
from ropo.distributed import is_main
from ropo.fingerprints import fingerprint_model_dir
from ropo.models import Tokenizer
from ropo.models.chat_format import load_chat_format
from ropo.models.export import TokenizerExport
from ropo.presets import resolve_inputs
from ropo.resources import DTYPES
from ropo.sft_config import SftConfig
from ropo.step import StepSettings

RunKind = TypeVar("RunKind", bound="TrainingRun")  # TrainingRun.start returns the class it is on
Position = TypeVar("Position", bound="LoopPosition")  # from_record returns the class it is on


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


@dataclass
class LoopPosition:
    """Where a training loop is, in optimizer steps; saved in every checkpoint so that `resume`
    continues exactly. `ropo sft` keeps this; `ropo train` adds its rounds (run_setup.LoopState)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    n_skipped_nonfinite: int = 0  # steps not applied for a NaN/inf loss or gradient

    def to_record(self) -> dict[str, Any]:
        """The position as JSON-ready values: the "loop" of a checkpoint's state.json."""
        return vars(self).copy()

    @classmethod
    def from_record(cls: type[Position], record: dict[str, Any]) -> Position:
        """The position a checkpoint saved with to_record."""
        return cls(**record)


@dataclass(frozen=True)
class RunInputs:
    """Where a training command reads and writes, resolved once, before its directory is made."""

    out: Path  # the run directory: `resume`, else `out`
    model_dir: Path
    data_file: Path
    data_format: str


def run_inputs(cfg: RunConfig | SftConfig) -> RunInputs:
    """The run's directory and inputs, once what can fail before the directory is made has been
    checked: the model and the data exist (every missing one named at once), and out= (and
    cache_dir=) can be made and written. A missing input found only after the lock would leave
    a directory that holds just the lock."""
    model_dir, data_file, data_format = resolve_inputs(
        cfg.model.model, cfg.data.data, cfg.data.format
    )
    out = Path(cfg.run.resume or cfg.run.out)
    run_dir.check_writable_dir(out, "out")
    if isinstance(cfg, RunConfig) and cfg.run.cache_dir:
        run_dir.check_writable_dir(Path(cfg.run.cache_dir), "cache_dir")
    return RunInputs(out, model_dir, data_file, data_format)


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


def checkpoint_state(state: LoopPosition, run: TrainingRun) -> dict[str, Any]:
    """The run state a checkpoint's state.json holds: loop counters and the resolved config."""
    saved = {
        "loop": state.to_record(),
        "config": run.cfg.to_flat_dict(),
        "run_id": run.identity.run_id,
    }
    if run.base_sha256:  # a LoRA checkpoint holds adapters for exactly this base model
        saved["base_model_sha256"] = run.base_sha256
    return saved
