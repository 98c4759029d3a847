"""Tiny random Llama/Mistral models for the tests; transformers is only the oracle here.

Every weight is random, norm scales included, so a swapped or misnamed tensor changes logits.
`tiny_config` is the one hand-written ModelConfig that tests without an HF oracle start from.
"""

from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from ropo.models import ModelConfig, Transformer

# The shared tiny ModelConfig: 2 layers, width 32, grouped-query attention (4 query heads, 2 kv).
TINY_MODEL_CONFIG = {
    "vocab_size": 50,
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "architecture": "LlamaForCausalLM",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
HF_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
TINY = {
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
}
# name -> (model type, overrides of TINY): the parity matrix of the brief.
CASES = {
    "mha": ("llama", {}),
    "gqa": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "rope_theta_1e6": ("llama", {"rope_theta": 1e6}),
    "mistral_window": (
        "mistral",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "sliding_window": 5},
    ),
    "mistral_no_window": ("mistral", {"sliding_window": None}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "head_dim_32": ("llama", {"head_dim": 32}),  # hidden / heads would be 16
}


def tiny_config(**overrides: object) -> ModelConfig:
    """TINY_MODEL_CONFIG with `overrides` (ModelConfig field names) on top; unknown names raise."""
    return ModelConfig(**(TINY_MODEL_CONFIG | overrides))


def hf_config(kind: str = "llama", **overrides: object) -> transformers.PretrainedConfig:
    config_class, _ = HF_CLASSES[kind]
    # eager is the plainest attention in transformers, so the oracle does not hide behind a kernel
    return config_class(**(TINY | overrides), attn_implementation="eager")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place: norm scales near 1, everything else N(0, 0.15^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.15 * noise)
    return model


def hf_model(
    kind: str = "llama", seed: int = 0, **overrides: object
) -> transformers.PreTrainedModel:
    """A tiny transformers model with random weights, in eval mode."""
    transformers.utils.logging.disable_progress_bar()
    _, model_class = HF_CLASSES[kind]
    return randomize_(model_class(hf_config(kind, **overrides)), seed).eval()


def our_model(kind: str = "llama", seed: int = 0, **overrides: object) -> Transformer:
    """A tiny ropo Transformer with random weights, configured through ModelConfig.from_hf."""
    config = ModelConfig.from_hf(hf_config(kind, **overrides).to_dict(), source="test")
    return randomize_(Transformer(config), seed).eval()


def save_hf(model: transformers.PreTrainedModel, path: Path, **kwargs: object) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def load_hf(path: Path, kind: str = "llama") -> transformers.PreTrainedModel:
    transformers.utils.logging.disable_progress_bar()
    _, model_class = HF_CLASSES[kind]
    return model_class.from_pretrained(path, attn_implementation="eager").eval()


def random_ids(
    batch: int, length: int, vocab: int = TINY["vocab_size"], seed: int = 0
) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(
    model: transformers.PreTrainedModel, ids: torch.Tensor, **kwargs: object
) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def packable_model(vocab_size: int, seed: int = 0) -> Transformer:
    """A tiny_config model with the fast kernels whose w1, w3 and w2 pass PackedLinear's size
    threshold (width 128, intermediate 512): two packed groups per layer while decoding."""
    from ropo.models.kernels import use_fast_kernels

    config = tiny_config(vocab_size=vocab_size, dim=128, head_dim=32, intermediate_size=512,
                         max_position_embeddings=256)  # fmt: skip
    return randomize_(use_fast_kernels(Transformer(config)), seed)


def count_packings(monkeypatch) -> list[int]:  # noqa: ANN001  (pytest.MonkeyPatch)
    """From now on, how many weight groups each packed_for_decoding block packs, in order
    (0: an enclosing block had packed them all)."""
    import ropo.models.kernels as kernels

    packs_of, packings = kernels.packs_of, []

    def counting_packs_of(module: torch.nn.Module) -> list:
        packs = packs_of(module)
        packings.append(len(packs))
        return packs

    monkeypatch.setattr(kernels, "packs_of", counting_packs_of)
    return packings
