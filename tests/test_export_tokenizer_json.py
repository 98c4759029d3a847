"""`<out>/final` of a tokenizer.json model: transformers' AutoTokenizer reads it back with the ids
and the chat template the run trained with.

Unit tests write the files of models/export.py for the tiny SmolLM2-like and Llama-3-like
tokenizers of tokenizer_fixtures.py, with the model's own template (template=auto) and with named
ones. One tiny `python -m ropo train` run on a SmolLM2-like model checks the whole path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model_fixtures import tiny_config
from ropo.models import Transformer, load_tokenizer, save_model
from ropo.models.chat_format import load_chat_format
from ropo.models.export import HF_FILES, TokenizerExport, write_tokenizer_files
from test_export import CONVERSATIONS, RUN, joined, write_ultrafeedback_pairs
from test_faults import ropo_train
from tokenizer_fixtures import SMOLLM2_TEMPLATE, llama3_like, smollm2_like

transformers = pytest.importorskip("transformers")

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "smollm2": smollm2_like,
    # SmolLM2's own class name, which transformers 5 would rebuild without the digit split
    "smollm2_gpt2": lambda path: smollm2_like(path, tokenizer_class="GPT2Tokenizer"),
    "llama3": llama3_like,
}
PAIRS = [
    ("Plan:", "steps:\n 1. read\n 2. think"),
    ("Question: apple banana", " cherry"),
    ("Answer: ", "café 東京 😀"),
    ("code:\n", "def f(x):\n\treturn 12345\n"),
]


def hf_tokenizer(path: Path) -> object:
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path))


def ids_of(hf: object, messages: list[dict], **kwargs: object) -> list[int]:
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("template", ["auto", "plain", "llama2-chat", "mistral-instruct"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_autotokenizer_reads_the_run_back(name: str, template: str, tmp_path: Path) -> None:
    model_dir = BUILDERS[name](tmp_path / "model")
    tokenizer = load_tokenizer(model_dir)
    chat = load_chat_format(model_dir, template, tokenizer)
    final = tmp_path / "final"
    final.mkdir()
    write_tokenizer_files(final, TokenizerExport(tokenizer, chat), 256)
    assert sorted(p.name for p in final.iterdir()) == sorted(HF_FILES)
    hf = hf_tokenizer(final)
    assert (hf.bos_token_id, hf.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
    for prompt, response in PAIRS:  # plain text: the tokenizer's BOS, the text, EOS
        ids = sum(tokenizer.encode_prompt_response(prompt, response), [])
        assert hf(joined(prompt, response)).input_ids + [hf.eos_token_id] == ids
    for messages in CONVERSATIONS:
        prompt = chat.prompt(messages)
        prompt_ids, _ = chat.encode(tokenizer, prompt, "")
        assert ids_of(hf, messages, add_generation_prompt=True) == prompt_ids
        for answer in (" apple", "apple", "apple \n"):  # no token across the boundary
            answered = [*messages, {"role": "assistant", "content": answer}]
            ids = sum(chat.encode(tokenizer, prompt, chat.response(messages, answer)), [])
            assert ids_of(hf, answered) == ids, (messages, answer)
    assert load_chat_format(final, "auto", load_tokenizer(final)) == chat  # final/ as model=
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_id


@pytest.fixture(scope="module")
def smollm2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the SmolLM2-like tokenizer (no tokenizer.model)."""
    model_dir = smollm2_like(tmp_path_factory.mktemp("smollm2_model"))
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    save_model(Transformer(config), model_dir)
    return model_dir


@pytest.mark.slow
def test_a_run_on_a_tokenizer_json_model(smollm2_model: Path, tmp_path: Path) -> None:
    """template=auto (the default) trains on the model's ChatML prompts, held-out pairs included;
    final/ and the checkpoint carry tokenizer.json and the model's template."""
    data = write_ultrafeedback_pairs(tmp_path / "uf.jsonl", 24)
    out = tmp_path / "run"
    args = [f"model={smollm2_model}", f"data={data}", f"out={out}", "format=ultrafeedback",
            "eval_split=0.2", *RUN]  # fmt: skip
    result = ropo_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "template=auto" not in result.stderr  # the model has a chat template
    final, checkpoint = out / "final", out / "checkpoints" / "round-1"
    for name in HF_FILES:
        assert (final / name).read_bytes() == (checkpoint / name).read_bytes(), name
    config = json.loads((final / "tokenizer_config.json").read_text())
    assert config["chat_template"] == SMOLLM2_TEMPLATE
    hf, ours = hf_tokenizer(final), load_tokenizer(final)
    chat = load_chat_format(final, "auto", ours)
    messages = [{"role": "user", "content": "Question: apple banana cherry"}]
    prompt_ids = chat.encode(ours, chat.prompt(messages), "")[0]
    assert ids_of(hf, messages, add_generation_prompt=True) == prompt_ids
    assert chat.prompt(messages).endswith("<|im_start|>assistant\n")
