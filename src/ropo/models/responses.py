"""Responses to prompts given as token ids: the sampler (sample.py) driven by a tokenizer.

The tokenizer decides three things for the sampler: its EOS ends a response, its pad fills the
rows that have ended, and no id at or past its vocabulary size is ever drawn (a checkpoint's
embedding may have padded rows that decode to nothing). Rejection sampling
(filter/rejection.py) and `ropo generate` (generate.py) both sample through here.
"""

from __future__ import annotations

import torch

from ropo.models.llama import Transformer
from ropo.models.sample import generate
from ropo.models.tokenizer import Tokenizer


def sample_responses(
    model: Transformer,
    prompts_ids: list[list[int]],
    tokenizer: Tokenizer,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
) -> list[list[int]]:
    """The new ids for each prompt (at most max_new_tokens, ending with EOS unless cut), drawn
    from `generator` at `temperature` (0: greedy) with nucleus threshold `top_p`."""
    return generate(
        model,
        prompts_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        generator=generator,
        vocab_limit=tokenizer.vocab_size,
    )
