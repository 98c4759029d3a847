"""Run configuration: the first stage of the data flow.

One frozen dataclass per concern, gathered into `RunConfig` (`ropo train`). Keys are flat
(`noise: 0.4`, not `data: {noise: 0.4}`) and every key is declared and documented once;
`config_load.py` fills them from a YAML file and `key=value` overrides, and reports anything else
as an error. Each value is checked once, in its dataclass's `__post_init__` (the checks are in
`config_fields.py`), so a bad value stops a run before it touches anything. This file declares
the keys of the method (data, loss, filter, optimizer); the keys of the machinery (how the policy
is held, the run directory, held-out pairs) are in `config_machinery.py`. `ropo sft` gathers the
sections it shares with training (DataFileSettings, OptimSettings and the machinery's
PolicySettings and RunDirSettings) into `sft_config.SftConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ropo.config_fields import (
    TEMPLATE_HELP,
    TEMPLATES,
    SectionedConfig,
    check_alpha,
    check_beta,
    check_choice,
    check_label_smoothing,
    check_range,
    setting,
)
from ropo.config_machinery import HeldoutSettings, PolicySettings, RunDirSettings

# The losses of loss/preference.py's table LOSSES, by the name the `loss` key takes.
LOSS_NAMES = ("dpo", "ipo", "cdpo", "rdpo", "ropo")
# How rejection sampling picks its pair (filter/rejection.py parses and documents them).
RS_PAIR_RULES = ("reward", "reward+original", "likelihood", "likelihood+original")


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
class LossSettings:
    """The loss and its parameters; loss/preference.py takes its defaults from here."""

    loss: str = setting("ropo", " | ".join(LOSS_NAMES))
    beta: float = setting(0.1, "inverse temperature of the implicit reward beta*log(pi/pi_ref)")
    # α = 14 as the paper's reviews and an independent re-implementation report it (the paper's
    # own tables could not be consulted); the ablations reported use 6, 14 and 30.
    alpha: float = setting(14.0, "ROPO's trade-off alpha (> 2); larger is more conservative")
    label_smoothing: float = setting(0.1, "epsilon of cdpo / rdpo (the assumed flip rate)")

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, LOSS_NAMES)
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
class RunSettings(RunDirSettings):
    cache_dir: str = setting("", "reference log-prob cache ('' = <out>/cache)")
    log_every: int = setting(10, "optimizer steps between metric lines in <out>/train_log.jsonl")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("log_every", self.log_every, 1, None)


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
