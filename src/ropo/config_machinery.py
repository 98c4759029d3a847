"""Config keys of the machinery behind the doors: how the policy is held (dtype, device,
mixed precision, LoRA), the run directory (resume, overwrite, checkpoints, SIGTERM, NaN steps) and
the held-out pairs scored during training.

Part of the first stage, the configuration; `config.py` gathers these sections with the method's
own keys into `RunConfig`, and `ropo sft` (sft_config.py) shares PolicySettings and
RunDirSettings. Declared and checked like every key (config_fields.py), so `ropo keys` lists them
and a bad value stops a run before it touches anything. A reader of the method can skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ropo.config_fields import DTYPE_NAMES, check_choice, check_device, check_range, setting

# Projections of a block that LoRA can adapt (names of models/llama.py; models/lora.py adapts).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class PolicySettings:
    """The model that trains and how it is held in memory: shared by `ropo train` and `ropo sft`."""

    model: str = setting(
        "",
        "HF model directory (config.json, safetensors, tokenizer.model or tokenizer.json) or a "
        "preset name (llama2-7b, mistral-7b, smollm2-135m) looked up under $MODELS_DIR",
    )
    dtype: str = setting("float32", "weights dtype: " + " | ".join(DTYPE_NAMES))
    save_dtype: str = setting(
        "",
        "dtype of the weights in <out>/final: float32 | bfloat16 | float16 ('' = the dtype of "
        "the input checkpoint's weights); checkpoints keep the training dtype for an exact resume",
    )
    autocast: str = setting(
        "none",
        "mixed precision for matmuls: none | bfloat16 (with float32 "
        "weights this is the usual fp32-master / bf16-compute setup)",
    )
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    activation_checkpointing: bool = setting(
        False, "recompute each block in backward to save memory"
    )
    lora_rank: int = setting(
        0,
        "rank r of LoRA adapters on the frozen model (0 = full fine-tuning); only the adapters "
        "train, and <out>/final holds them merged into the weights",
    )
    lora_alpha: float = setting(16.0, "LoRA scale numerator: the adapter output is times alpha / r")
    lora_targets: str = setting(
        ",".join(LORA_TARGETS),
        "comma-separated projections that get adapters: wq,wk,wv,wo (attention), w1,w2,w3 (MLP)",
    )

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        if self.save_dtype:  # '' follows the input checkpoint
            check_choice("save_dtype", self.save_dtype, DTYPE_NAMES)
        check_choice("autocast", self.autocast, ("none", "bfloat16"))
        check_device(self.device)
        check_range("lora_rank", self.lora_rank, 0, None)
        check_range("lora_alpha", self.lora_alpha, 0.0, None, low_open=True)
        targets = self.lora_targets.split(",")
        if not set(targets) <= set(LORA_TARGETS) or len(set(targets)) != len(targets):
            raise ValueError(
                f"config key 'lora_targets' = {self.lora_targets!r} must be distinct names "
                f"from {','.join(LORA_TARGETS)}, separated by commas"
            )


@dataclass(frozen=True)
class HeldoutSettings:
    eval_data: str = setting(
        "",
        "held-out preference file (read with format, template and max_length as data=), scored "
        "at the start and after every round into metrics.jsonl ('' = none)",
    )
    eval_split: float = setting(
        0.0,
        "instead of eval_data: hold out this share of data=, chosen by seed, never trained on "
        "and never noised (ids in run.json eval_ids), 0 <= share < 0.5",
    )
    eval_every: int = setting(
        0,
        "also score the held-out pairs every N optimizer steps, into train_log.jsonl "
        "(0 = only at the start and after every round)",
    )

    def __post_init__(self) -> None:
        check_range("eval_split", self.eval_split, 0.0, 0.5, high_open=True)
        check_range("eval_every", self.eval_every, 0, None)
        if self.eval_data and self.eval_split:
            raise ValueError(
                f"config key 'eval_split' = {self.eval_split!r} and eval_data = "
                f"{self.eval_data!r}: give one held-out set, eval_data or eval_split, not both"
            )
        if self.eval_every and not (self.eval_data or self.eval_split):
            raise ValueError(
                f"config key 'eval_every' = {self.eval_every!r} needs held-out pairs: set "
                "eval_data=FILE or eval_split=SHARE too"
            )


@dataclass(frozen=True)
class RunDirSettings:
    """The run directory, seeding, checkpoints and stopping: shared by train and sft."""

    out: str = setting("runs/default", "run directory: checkpoints, audit files, report")
    seed: int = setting(0, "seeds noise injection, data order and sampling")
    resume: str = setting("", "run directory to continue from its last checkpoint ('' = fresh)")
    overwrite: bool = setting(
        False,
        "let a fresh run start in a non-empty out= directory: its old contents are deleted once "
        "the new run's config, model and tokenizer check out (without it, such a run is refused)",
    )
    term_grace: float = setting(
        30.0,
        "seconds a scheduler waits between SIGTERM and SIGKILL (Slurm's KillWait defaults to 30): "
        "on SIGTERM the run checkpoints at the next step boundary if that fits, then stops",
    )
    save_every: int = setting(
        0, "optimizer steps between checkpoints within a round or epoch (0 = at its end only)"
    )
    skip_nonfinite: bool = setting(
        False,
        "on a NaN/inf loss or gradient, skip that step (counted in metrics.jsonl "
        "n_skipped_nonfinite) instead of stopping the run at the last good checkpoint",
    )

    def __post_init__(self) -> None:
        check_range("save_every", self.save_every, 0, None)
        check_range("term_grace", self.term_grace, 0.0, None)
