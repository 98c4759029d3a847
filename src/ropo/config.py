"""Run configuration: the first stage of the data flow.

One frozen dataclass per concern, gathered into `RunConfig` (`ropo train`). Keys are flat
(`noise: 0.4`, not `data: {noise: 0.4}`) and every key is declared and documented below;
`config_load.py` fills them from a YAML file and `key=value` overrides, and reports anything else
as an error. `ropo sft` gathers the sections it shares with training (the base classes
PolicySettings, DataFileSettings, RunDirSettings and OptimSettings) into `sft_config.SftConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The `template` key: "auto" or a named template of models/chat_templates.py (chat_format.py).
TEMPLATES = ("auto", "plain", "llama2-chat", "mistral-instruct")
TEMPLATE_HELP = (
    "chat template of prompts and responses: auto (the model's own chat_template from "
    "tokenizer_config.json or chat_template.jinja; plain if it has none) | plain | "
    "llama2-chat | mistral-instruct"
)
# Projections of a block that LoRA can adapt (names of models/llama.py; models/lora.py adapts).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# How rejection sampling picks its pair (filter/rejection.py parses and documents them).
RS_PAIR_RULES = ("reward", "reward+original", "likelihood", "likelihood+original")


def setting(default: Any, help: str) -> Any:
    """A config key: its default and the help line `ropo keys` (or a subcommand's --help) shows."""
    return field(default=default, metadata={"help": help})


def setting_help(settings: type, key: str) -> str:
    """The help line of `key` in the settings dataclass `settings`."""
    return settings.__dataclass_fields__[key].metadata["help"]


def describe_settings(settings: type, header: str = "keys (key=value):") -> str:
    """`header`, then every key of the settings dataclass `settings` with its default and help
    line: the --help of a command with one flat set of keys (`ropo generate`, `ropo eval`)."""
    keys = dataclasses.fields(settings)
    defaults = [_as_typed(f.default) for f in keys]
    name_width = max(len(f.name) for f in keys)
    default_width = min(max(len(default) for default in defaults), 20)  # a longer one overflows
    lines = [header]
    for f, default in zip(keys, defaults, strict=True):
        lines.append(f"  {f.name:<{name_width}} {default:<{default_width}} {f.metadata['help']}")
    return "\n".join(lines)


def _as_typed(default: Any) -> str:
    """A default as a user writes it: a tuple key's values comma-separated (sweep_seeds=0,1,2)."""
    return ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)


@dataclass(frozen=True)
class PolicySettings:
    """The model that trains and how it is held in memory: shared by `ropo train` and `ropo sft`."""

    model: str = setting(
        "",
        "HF model directory (config.json, safetensors, tokenizer.model or tokenizer.json) or a "
        "preset name (llama2-7b, mistral-7b, smollm2-135m) looked up under $MODELS_DIR",
    )
    dtype: str = setting("float32", "weights dtype: float32 | bfloat16 | float16")
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
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.save_dtype:  # '' follows the input checkpoint
            check_choice("save_dtype", self.save_dtype, ("float32", "bfloat16", "float16"))
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
class ModelSettings(PolicySettings):
    reference: str = setting(
        "",
        "the frozen reference pi_ref of beta*log(pi/pi_ref): an HF model directory or preset "
        "with the policy's architecture and tokenizer, e.g. the SFT model when `model` is "
        "another starting point ('' = model)",
    )


@dataclass(frozen=True)
class DataFileSettings:
    """The training file and how its records become token ids: shared by train and sft."""

    data: str = setting(
        "", "preference JSONL file or a preset name (ultrafeedback) under $DATA_DIR"
    )
    format: str = setting("plain", "plain | ultrafeedback | alpaca_comparison | tldr")
    template: str = setting("auto", TEMPLATE_HELP)
    max_length: int = setting(512, "prompt + response tokens; responses are cut at the end to fit")
    strict_data: bool = setting(
        False,
        "stop at a record that can be skipped otherwise (format=tldr: info.post null) instead of "
        "skipping it and counting it in the data report",
    )

    def __post_init__(self) -> None:
        check_choice("format", self.format, ("plain", "ultrafeedback", "alpaca_comparison", "tldr"))
        check_choice("template", self.template, TEMPLATES)
        check_range("max_length", self.max_length, 2, None)


@dataclass(frozen=True)
class DataSettings(DataFileSettings):
    noise: float = setting(
        0.0, "symmetric label-flip rate eta injected into the data, 0 <= eta < 0.5"
    )
    max_pairs: int = setting(0, "use only the first N pairs of the file (0 = all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("noise", self.noise, 0.0, 0.5, high_open=True)
        check_range("max_pairs", self.max_pairs, 0, None)


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
class LossSettings:
    loss: str = setting("ropo", "dpo | ipo | cdpo | rdpo | ropo")
    beta: float = setting(0.1, "inverse temperature of the implicit reward beta*log(pi/pi_ref)")
    alpha: float = setting(14.0, "ROPO's trade-off alpha (> 2); larger is more conservative")
    label_smoothing: float = setting(0.1, "epsilon of cdpo / rdpo (the assumed flip rate)")

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, ("dpo", "ipo", "cdpo", "rdpo", "ropo"))
        # Every key is checked, also those the chosen loss does not use: a typo'd value in a
        # config file should not wait for the day the loss is switched.
        check_beta(self.beta)
        check_alpha(self.alpha)
        check_label_smoothing(self.label_smoothing)


@dataclass(frozen=True)
class FilterSettings:
    rounds: int = setting(3, "train-then-filter rounds; rounds=1 rho=0 is plain training")
    rho: float | str = setting(
        0.2,
        "share of pairs dropped after each round (lowest margin = highest ROPO loss), or auto: "
        "the flip rate estimated from the margins each round (filter/noise_rate.py)",
    )
    filter_score: str = setting(
        "margin",
        "what the w-step ranks pairs by, lowest dropped first: margin (the implicit reward "
        "margin, the order of the paper's loss) or preference (the policy's own log-prob ratio "
        "log pi(chosen)/pi(rejected): also counts what the starting model preferred; for pairs "
        "sampled from the starting model, docs/method.md)",
    )
    last_round: str = setting(
        "continue",
        "continue: the last round trains on like the rounds before it (our reconstruction of the "
        "paper); restart: a fresh policy from the starting model, plain DPO on the kept pairs",
    )
    last_round_epochs: int = setting(0, "epochs of the last round (0 = epochs)")
    rejection_sampling: bool = setting(
        False, "replace dropped pairs by pairs sampled from the policy"
    )
    rs_k: int = setting(4, "responses sampled per prompt of a dropped pair")
    rs_temperature: float = setting(1.0, "sampling temperature for rejection sampling")
    rs_top_p: float = setting(1.0, "nucleus sampling threshold for rejection sampling")
    rs_max_new_tokens: int = setting(128, "length limit of sampled responses")
    rs_pair_rule: str = setting(
        "reward",
        "how a sampled pair is picked from the candidates: reward (highest vs lowest implicit "
        "reward of the K samples) | likelihood (highest vs lowest policy log-prob per token); "
        "+original adds the dropped pair's two responses to the candidates (docs/method.md 4)",
    )

    def __post_init__(self) -> None:
        check_range("rounds", self.rounds, 1, None)
        if self.rho != "auto":
            if isinstance(self.rho, str):
                raise ValueError(
                    f"config key 'rho' = {self.rho!r}: expected a share in [0, 1) or auto"
                )
            check_range("rho", self.rho, 0.0, 1.0, high_open=True)
        check_choice("filter_score", self.filter_score, ("margin", "preference"))
        check_choice("last_round", self.last_round, ("continue", "restart"))
        if self.last_round == "restart" and self.rounds < 2:
            raise ValueError(
                "config key 'last_round' = 'restart' needs rounds >= 2 (got rounds="
                f"{self.rounds}): the rounds before the last one find the pairs it drops"
            )
        check_range("last_round_epochs", self.last_round_epochs, 0, None)
        check_range("rs_k", self.rs_k, 2, None)
        check_range("rs_temperature", self.rs_temperature, 0.0, None)
        check_range("rs_top_p", self.rs_top_p, 0.0, 1.0, low_open=True)
        check_range("rs_max_new_tokens", self.rs_max_new_tokens, 1, None)
        check_choice("rs_pair_rule", self.rs_pair_rule, RS_PAIR_RULES)


@dataclass(frozen=True)
class OptimSettings:
    epochs: int = setting(1, "epochs over the training set in every round")
    lr: float = setting(5e-7, "peak AdamW learning rate")
    batch_size: int = setting(
        8, "pairs (ropo sft: examples) per micro-batch; a step takes grad_accum"
    )
    grad_accum: int = setting(1, "micro-batches per optimizer step; the loss is averaged over all")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay")
    warmup_ratio: float = setting(0.1, "share of all steps spent warming the learning rate up")
    schedule: str = setting("cosine", "cosine | linear | constant decay after warm-up")
    max_grad_norm: float = setting(1.0, "gradient clipping threshold (0 = off)")

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 1, None)
        check_range("lr", self.lr, 0.0, None, low_open=True)
        check_range("batch_size", self.batch_size, 1, None)
        check_range("grad_accum", self.grad_accum, 1, None)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        check_range("max_grad_norm", self.max_grad_norm, 0.0, None)


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


@dataclass(frozen=True)
class RunSettings(RunDirSettings):
    cache_dir: str = setting("", "reference log-prob cache ('' = <out>/cache)")
    log_every: int = setting(10, "optimizer steps between metric lines in <out>/train_log.jsonl")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("log_every", self.log_every, 1, None)


@dataclass(frozen=True)
class SectionedConfig:
    """The settings of one command: each field is a section (a settings dataclass) whose fields
    are the flat keys. `command` and `keys_help` name the command in errors."""

    command: ClassVar[str] = "ropo train"
    keys_help: ClassVar[str] = "`ropo keys`"

    @classmethod
    def sections(cls) -> dict[str, type]:
        """Section name -> settings class, in declaration order."""
        return {f.name: f.default_factory for f in dataclasses.fields(cls)}

    @classmethod
    def keys(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """Every key -> (its section, its field)."""
        owners = {}
        for section, settings in cls.sections().items():
            for f in dataclasses.fields(settings):
                assert f.name not in owners, f"config key {f.name} declared twice"
                owners[f.name] = (section, f)
        return owners

    def to_flat_dict(self) -> dict[str, Any]:
        """Every key with its resolved value, in declaration order (written beside every run)."""
        flat: dict[str, Any] = {}
        for section in self.sections():
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat


@dataclass(frozen=True)
class RunConfig(SectionedConfig):
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    heldout: HeldoutSettings = field(default_factory=HeldoutSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)


SECTIONS = RunConfig.sections()
KEYS = RunConfig.keys()


def describe_keys(config: type[SectionedConfig] = RunConfig) -> str:
    """A table of every key, its default and its meaning (`ropo keys`, `ropo sft --help`)."""
    lines = []
    for section, cls in config.sections().items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name:<26} {f.default!r:<16} {f.metadata['help']}")
    return "\n".join(lines)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming `name` and `value` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"config key '{name}' = {value!r} is not one of {', '.join(choices)}")


def check_device(value: str) -> None:
    """ValueError naming the key unless `value` is auto, cpu, cuda or cuda:N (N = 0, 1, ...)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError(
            f"config key 'device' = {value!r} is not one of auto, cpu, cuda, cuda:N "
            "(N = 0, 1, ... the GPU index)"
        )


# The loss parameters' checks live here, the first stage, so that a run refuses a bad value before
# it touches the model; loss/preference.py calls the same functions when a loss is built.
def check_beta(beta: float) -> None:
    """ValueError unless the DPO beta is a finite number > 0."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"config key 'beta': beta must be a finite number > 0, got {beta!r}")


def check_alpha(alpha: float) -> None:
    """ValueError unless ROPO's alpha is a finite number > 2, and why."""
    if not (math.isfinite(alpha) and alpha > 2):
        raise ValueError(
            f"config key 'alpha': ROPO alpha must be a finite number > 2, got {alpha!r}: only "
            "for alpha > 2 does a pair the model confidently contradicts (t → −∞, gradient "
            "weight 4α/(1+α)²) get less gradient than an ambiguous one (t = 0, weight "
            "4α/(1+α)² · (2+α)/4)"
        )


def check_label_smoothing(label_smoothing: float) -> None:
    """ValueError unless the flip rate epsilon of cDPO/rDPO is in [0, 0.5)."""
    # ε ≥ 0.5 would mean the labels are more often wrong than right; rDPO divides by 1 − 2ε.
    if not (math.isfinite(label_smoothing) and 0 <= label_smoothing < 0.5):
        raise ValueError(
            f"config key 'label_smoothing': label_smoothing must be in [0, 0.5), got "
            f"{label_smoothing!r} (it is the assumed flip rate; at 0.5 labels carry no signal)"
        )


def check_range(
    name: str,
    value: float,
    low: float | None,
    high: float | None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ValueError naming `name` and `value` unless it is finite and within [low, high] (None: no
    bound; *_open: that end excluded). The built-in task's settings use it too."""
    bad = isinstance(value, float) and not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"config key '{name}' = {value!r} must be {bounds}")
