"""The network, its weights on disk, its tokenizer and its sampler.

Public interface (other parts of ropo and outside checks call these by name):
    load_model(path, dtype=None, device=None) -> Transformer
    save_model(model, path)                   -> writes config.json + safetensors in HF layout
    load_tokenizer(path)                      -> Tokenizer over tokenizer.model or tokenizer.json
    generate(model, prompts_ids, ...)         -> sampled continuations, KV-cached
"""

from ropo.models.config import ModelConfig
from ropo.models.llama import Transformer
from ropo.models.load import load_model, save_model
from ropo.models.sample import generate
from ropo.models.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
]
