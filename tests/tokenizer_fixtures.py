"""Tiny tokenizers trained on varied synthetic text, for tests: a Llama-style sentencepiece model
and two tokenizer.json models (SmolLM2-like and Llama-3-like) with their tokenizer_config.json.

Imported by test modules (not a conftest); each trains in well under a second.
"""

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ropo.models.spm_tokenizer import SentencePieceTokenizer
from ropo.models.tokenizer import train_tokenizer

WORDS = (
    "the quick brown fox jumps over a lazy dog while my friend reads the post and writes a short "
    "summary question answer Paris is the capital of France because however therefore hello world "
    "I think you should ask them what happened yesterday at work"
).split()
EXTRAS = [
    "café", "naïve", "résumé", "Über", "Straße", "東京", "北京市", "こんにちは", "😀", "🚀",
    "Привет", "مرحبا", "[INST]", "[/INST]", "<<SYS>>", "TL;DR:", "r/relationships", "2+2=4",
    "3.14159", "def f(x):", "(yes)", "don't", "e-mail", "$100", "#tag", "«quote»", "—",
]  # fmt: skip
VOCAB_SIZE = 500


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """`n` texts mixing English words, accents, CJK, emoji, digits, tabs and newlines."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [
            rng.choice(WORDS if rng.random() < 0.8 else EXTRAS) for _ in range(rng.randint(3, 14))
        ]
        text = " ".join(words)
        if i % 5 == 0:
            text += "\n" + " ".join(rng.choice(WORDS) for _ in range(5))
        if i % 11 == 0:
            text = "\t" + text + "  "
        texts.append(text)
    return texts


def tiny_tokenizer(out_dir: Path) -> SentencePieceTokenizer:
    """Train the test tokenizer into `out_dir`/tokenizer.model."""
    return train_tokenizer(corpus(), out_dir, vocab_size=VOCAB_SIZE)


# --- tokenizer.json models --------------------------------------------------------------------
# Two tiny byte-level BPE tokenizers trained with Hugging Face `tokenizers`, each written with a
# tokenizer_config.json as the real model ships it: SmolLM2-like (ChatML, no BOS, digits split
# one by one) and Llama-3-like (BOS added by the post-processor, a template that writes
# {{ bos_token }} and trims every turn).

SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]
SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's own
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>",
]  # fmt: skip
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's own
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CODE = [
    "def f(x):\n\treturn x + 1\n",
    "for i in range(10):\n    print(i)  # count\n",
    "```python\nimport os\n\nprint(os.getcwd())\n```",
    '{"key": [1, 2, 3], "name": "東京"}',
    "steps:\n 1. read\n 2. think\n 3. answer\n",  # "\n " before a digit: one SmolLM2 token
]


def _train_byte_level_bpe(
    specials: list[str], pre_tokenizer: pre_tokenizers.PreTokenizer, vocab_size: int
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus() + CODE * 20, trainer)
    return tokenizer


def _write_config(out_dir: Path, config: dict) -> None:
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def smollm2_like(
    out_dir: Path, vocab_size: int = 600, tokenizer_class: str = "PreTrainedTokenizerFast"
) -> Path:
    """`out_dir` with a SmolLM2-like tokenizer.json and tokenizer_config.json; returns it.

    SmolLM2 itself names the class GPT2Tokenizer, which transformers 5 rebuilds from the vocabulary
    without the digit split of tokenizer.json; the generic class (the default here, and what
    ropo convert-gguf writes) reads tokenizer.json as it is, as transformers 4 did."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer = _train_byte_level_bpe(SMOLLM2_SPECIALS, pre, vocab_size)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_config(
        out_dir,
        {
            "add_prefix_space": False,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": "<|im_start|>",
            "chat_template": SMOLLM2_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "model_max_length": 8192,
            "pad_token": "<|im_end|>",
            "tokenizer_class": tokenizer_class,
            "unk_token": "<|endoftext|>",
        },
    )
    return out_dir


def llama3_like(out_dir: Path, vocab_size: int = 600) -> Path:
    """`out_dir` with a Llama-3-like tokenizer.json and tokenizer_config.json; returns it."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer = _train_byte_level_bpe(LLAMA3_SPECIALS, pre, vocab_size)
    bos = ("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1", special_tokens=[bos]
            ),
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    bos_token = {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False, "__type": "AddedToken"}  # fmt: skip
    _write_config(
        out_dir,
        {
            "bos_token": bos_token,  # as an AddedToken object, as some configs write it
            "chat_template": LLAMA3_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    return out_dir
