"""The model's hyperparameters: config.json -> ModelConfig -> Transformer (models/llama.py).

load.py and a run's early checks (policy.py: once, for all of them) read a checkpoint's
config.json with read_model_config (ModelConfig.from_hf), and save_model writes it back with
to_hf; unsupported Hugging Face settings and fields of the wrong JSON type are refused here,
before any weight is built.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropo.models.files import read_json

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
MODEL_TYPES = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
# What transformers assumes when config.json leaves a field out; it differs by model type.
HF_DEFAULTS = {
    "llama": dict(num_key_value_heads=None, max_position_embeddings=2048, sliding_window=None),
    "mistral": dict(num_key_value_heads=8, max_position_embeddings=131072, sliding_window=4096),
}
# Fields that would change the math if set otherwise; we refuse rather than silently ignore them.
MUST_BE = {
    "hidden_act": ("silu",),
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
    "pretraining_tp": (1, None),
    "rope_scaling": (None,),
    "attention_dropout": (0.0, None),
    "quantization_config": (None,),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a width


# What each field we read must be, when it is present and not null. The description is the test.
FIELD_KINDS: dict[str, str] = {
    **dict.fromkeys(
        (*REQUIRED, "num_attention_heads", "num_key_value_heads", "head_dim",
         "max_position_embeddings", "sliding_window"),
        "a positive integer",
    ),
    "rms_norm_eps": "a number",
    "rope_theta": "a number",
    "rope_parameters": "an object",
    "tie_word_embeddings": "true or false",
    "bos_token_id": "an integer",
    "eos_token_id": "an integer or a non-empty list of integers",
    "architectures": "a list of strings",
    "model_type": "a string",
}  # fmt: skip
KIND_TESTS: dict[str, Callable[[Any], bool]] = {
    "a positive integer": lambda v: _is_int(v) and v >= 1,
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "true or false": lambda v: isinstance(v, bool),
    "an integer": _is_int,
    "an integer or a non-empty list of integers": lambda v: (
        _is_int(v) or (isinstance(v, list) and len(v) > 0 and all(map(_is_int, v)))
    ),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a string": lambda v: isinstance(v, str),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    architecture: str  # "LlamaForCausalLM" | "MistralForCausalLM"
    bos_token_id: int | None
    eos_token_id: int | None

    def __post_init__(self) -> None:
        if self.architecture not in MODEL_TYPES:
            raise ValueError(f"architecture={self.architecture!r}; supported: {ARCHITECTURES}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face config.json dict; unsupported settings raise ValueError."""
        _check_kinds(hf, source)
        model_type = _model_type(hf, source)
        for field, allowed in MUST_BE.items():
            if field in hf and hf[field] not in allowed:
                raise ValueError(
                    f"{source}: {field}={hf[field]!r} is not supported (need one of {allowed})"
                )
        for field in (*REQUIRED, "num_attention_heads"):
            if hf.get(field) is None:
                raise ValueError(f"{source}: required field {field!r} is missing")
        defaults = HF_DEFAULTS[model_type]
        if model_type == "llama" and hf.get("sliding_window") is not None:
            raise ValueError(
                f"{source}: sliding_window={hf['sliding_window']!r} on a Llama "
                "model; transformers ignores it there, so we refuse to guess"
            )
        n_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", 2)
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or defaults["num_key_value_heads"] or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            intermediate_size=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(hf, source),
            max_position_embeddings=hf.get(
                "max_position_embeddings", defaults["max_position_embeddings"]
            ),
            sliding_window=hf.get("sliding_window", defaults["sliding_window"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            architecture=ARCHITECTURES[model_type],
            bos_token_id=hf.get("bos_token_id", 1),
            # Several stop ids (a list) are a generation concern; the first is the canonical EOS.
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def to_hf(self) -> dict:
        """A config.json dict that transformers 4.x and 5.x load as the same network."""
        model_type = MODEL_TYPES[self.architecture]
        hf = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            # 4.x reads rope_theta, 5.x reads rope_parameters; write both so either loads it.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        else:
            hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        return hf

    def num_params(self) -> int:
        """Parameter count; a tied LM head is counted once."""
        embeddings = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.n_layers * self.block_params() + self.dim  # + the final norm

    def block_params(self) -> int:
        """Parameters of one transformer block: attention, the SwiGLU MLP and its two norms."""
        C, HD, KD = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = C * HD + 2 * C * KD + HD * C
        mlp = 3 * C * self.intermediate_size
        return attention + mlp + 2 * C


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of `model_dir`/config.json; errors name the file (and line, for bad JSON)."""
    config_file = Path(model_dir) / "config.json"
    hf = read_json(config_file, missing=f"no config.json in {model_dir}")
    return ModelConfig.from_hf(hf, source=str(config_file))


def _check_kinds(hf: Any, source: str) -> None:
    if not isinstance(hf, dict):
        raise ValueError(
            f"{source}: expected a JSON object of model settings, got {type(hf).__name__}"
        )
    for field, kind in FIELD_KINDS.items():
        value = hf.get(field)
        if value is not None and not KIND_TESTS[kind](value):  # null: the default applies
            raise ValueError(f"{source}: field '{field}' = {value!r} must be {kind}")


def _model_type(hf: dict, source: str) -> str:
    archs, model_type = hf.get("architectures"), hf.get("model_type")
    if archs is not None:  # the class transformers would build decides
        arch_type = MODEL_TYPES.get(archs[0]) if len(archs) == 1 else None
        if arch_type is None or model_type not in (None, arch_type):
            raise ValueError(
                f"{source}: architectures={archs!r} with model_type={model_type!r} "
                f"is not supported; supported: {ARCHITECTURES}"
            )
        return arch_type
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{source}: model_type={model_type!r} is not supported; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    return model_type


def _rope_theta(hf: dict, source: str) -> float:
    # transformers 4.x writes rope_theta; 5.x writes rope_parameters={"rope_type", "rope_theta"}.
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" or set(params) - {"rope_type", "type", "rope_theta"}:
        raise ValueError(
            f"{source}: rope_parameters={params!r} is not supported "
            "(only plain RoPE: rope_type 'default' with rope_theta)"
        )
    if not KIND_TESTS["a number"](theta):
        raise ValueError(
            f"{source}: field 'rope_parameters.rope_theta' = {theta!r} must be a number"
        )
    if float(hf.get("rope_theta", theta)) != float(theta):
        raise ValueError(
            f"{source}: rope_theta={hf['rope_theta']!r} disagrees with "
            f"rope_parameters.rope_theta={theta!r}"
        )
    return float(theta)
