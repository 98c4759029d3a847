"""tokenizer.json models: ids equal transformers' AutoTokenizer, special tokens from the config
files, BOS as the post-processor or add_bos_token decides, and the prompt/response boundary.

The tokenizers are tiny byte-level BPEs trained here (tokenizer_fixtures.py): SmolLM2-like (no BOS,
digits one by one) and Llama-3-like (the post-processor adds <|begin_of_text|>).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend

from ropo.models.hf_tokenizer import HFTokenizer
from ropo.models.tokenizer import load_tokenizer
from tokenizer_fixtures import llama3_like, smollm2_like

transformers = pytest.importorskip("transformers")

BUILDERS: dict[str, Callable[[Path], Path]] = {"smollm2": smollm2_like, "llama3": llama3_like}
TEXTS = [
    "",
    "hello world",
    " leading space",
    "trailing space ",
    "double  space and   three",
    "line one\nline two\n",
    "\n\nstarts with newlines\r\n",
    "café naïve résumé Straße",
    "東京 北京市 こんにちは",
    "emoji 😀🚀 mixed👍🏽",
    "Привет мир, مرحبا",
    "digits 12345 and 3.14159, 2+2=4",
    "def f(x):\n\tif x:\n\t\treturn x  # tabs\n    spaces = [1, 2]\n",
    "```python\nprint('hi')\n```",
    "<|im_start|>user\nspecials in the text<|im_end|>",
    "unseen chars: ☃ ∑ ॐ",
]
# (prompt, response) pairs: the response joins as boundary.join_at_boundary says.
PAIRS = [
    ("Question: what is 2+2?", "4"),
    ("Answer: ", "Paris is the capital"),
    ("TL;DR:", " my friend reads"),
    ("東京", "😀 ok"),
    ("tabs", "\tthe fox"),
    ("code:\n", "def f(x):\n\treturn x\n"),
]


def hf_tokenizer(path: Path) -> object:
    transformers.utils.logging.set_verbosity_error()  # the ByteLevel class notice
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def joined(prompt: str, response: str) -> str:
    """prompt + response as one text, joined as boundary.join_at_boundary joins them."""
    body = prompt.rstrip(" ")
    response = prompt[len(body) :] + response
    needs_space = not (body[-1:].isspace() or response[:1].isspace())
    return body + " " * needs_space + response


def test_ids_equal_autotokenizer(model_dir: Path) -> None:
    ours, hf = load_tokenizer(model_dir), hf_tokenizer(model_dir)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == hf.decode(
            hf.encode(text, add_special_tokens=False), skip_special_tokens=True
        )
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.vocab_size == len(hf)


def test_plain_pairs_are_autotokenizers_ids_plus_eos(model_dir: Path) -> None:
    """A prompt starts as AutoTokenizer starts a text (SmolLM2: no BOS; Llama-3: BOS), and
    prompt + response ids are its ids of the joined text, then one EOS."""
    ours, hf = load_tokenizer(model_dir), hf_tokenizer(model_dir)
    for prompt, response in PAIRS:
        prompt_ids, response_ids = ours.encode_prompt_response(prompt, response)
        assert prompt_ids == hf(prompt.rstrip(" ")).input_ids, prompt
        assert prompt_ids + response_ids == hf(joined(prompt, response)).input_ids + [
            hf.eos_token_id
        ]
        assert prompt_ids == ours.encode_prompt_response(prompt, "another answer")[0]
        assert response_ids.count(ours.eos_id) == 1 and ours.bos_id not in response_ids


def test_special_tokens_come_from_tokenizer_config(tmp_path: Path) -> None:
    smol, llama = (
        load_tokenizer(smollm2_like(tmp_path / "s")),
        load_tokenizer(llama3_like(tmp_path / "l")),
    )
    vocab = smol.backend.get_vocab()
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (vocab["<|im_start|>"], vocab["<|im_end|>"],
                                                      vocab["<|im_end|>"])  # fmt: skip
    assert not smol.adds_bos  # SmolLM2's ByteLevel post-processor adds nothing
    assert smol.special_tokens == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
    }  # fmt: skip
    vocab = llama.backend.get_vocab()
    assert llama.bos_id == vocab["<|begin_of_text|>"]  # written as an AddedToken object
    assert llama.adds_bos and llama.encode_prompt_response("hi", "x")[0][0] == llama.bos_id
    assert llama.eos_id == llama.pad_id == vocab["<|eot_id|>"]  # no pad token: EOS pads


def rewrite_config(model_dir: Path, **changes: object) -> None:
    """Set (or with None remove) keys of tokenizer_config.json."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        config.pop(key, None)
        if value is not None:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("build", "adds_bos"), [(smollm2_like, False), (llama3_like, True)])
def test_tokenizer_json_decides_the_bos_not_add_bos_token(
    tmp_path: Path, build: Callable[[Path], Path], adds_bos: bool
) -> None:
    """add_bos_token in tokenizer_config.json that contradicts tokenizer.json's post-processor:
    transformers 5 drops it, and so does ropo."""
    model_dir = build(tmp_path)
    rewrite_config(model_dir, add_bos_token=not adds_bos, add_eos_token=True)
    ours, hf = load_tokenizer(model_dir), hf_tokenizer(model_dir)
    assert ours.adds_bos == adds_bos
    for prompt, response in PAIRS:
        ids = sum(ours.encode_prompt_response(prompt, response), [])
        assert ids == hf(joined(prompt, response)).input_ids + [hf.eos_token_id]


def test_ids_missing_from_tokenizer_config_come_from_the_model_configs(tmp_path: Path) -> None:
    model_dir = smollm2_like(tmp_path)
    rewrite_config(model_dir, eos_token=None, pad_token=None)
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 0, "pad_token_id": 3}))
    ours = load_tokenizer(model_dir)
    assert (ours.eos_id, ours.pad_id) == (0, 3)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_tokenizer(model_dir).eos_id == 2  # generation_config.json first; a list's first
    (model_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<repo_name>"}))
    assert load_tokenizer(model_dir).eos_id == 3  # the older file names it as a string


def test_bad_tokenizer_files_are_named(tmp_path: Path) -> None:
    model_dir = smollm2_like(tmp_path)
    rewrite_config(model_dir, bos_token="<|no_such_token|>")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token '<\|no_such_token\|>'"):
        load_tokenizer(model_dir)
    rewrite_config(model_dir, bos_token=None, eos_token=None)
    with pytest.raises(ValueError, match=f"{model_dir}: no EOS token"):
        load_tokenizer(model_dir)
    (model_dir / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    with pytest.raises(ValueError, match=f"{model_dir / 'tokenizer.json'}: not a tokenizer.json"):
        load_tokenizer(model_dir)


def test_decode_drops_special_tokens(tmp_path: Path) -> None:
    ours = load_tokenizer(smollm2_like(tmp_path))
    ids = ours.encode("<|im_start|>assistant\nParis<|im_end|>\n")
    assert ours.decode(ids) == "assistant\nParis\n"  # as ropo's sentencepiece drops BOS/EOS


def test_a_token_across_the_boundary_leaves_the_prompt_its_own_ids(tmp_path: Path) -> None:
    """Llama-3's split pattern keeps "):" and a following newline together, so "def f(x):" +
    "\\n\\treturn" shares a token: the prompt keeps its own ids (the same for every response)
    and the response is encoded on its own (boundary.split_after_prompt)."""
    ours = load_tokenizer(llama3_like(tmp_path))
    prompt, response = "def f(x):", "\n\treturn x"
    whole = ours.encode(prompt + response)
    prompt_ids, response_ids = ours.encode_prompt_response(prompt, response)
    assert whole[: len(prompt_ids) - 1] != prompt_ids[1:]  # the merge this test is about
    assert prompt_ids == [ours.bos_id] + ours.encode(prompt)
    assert response_ids == ours.encode(response) + [ours.eos_id]
    assert ours.decode(prompt_ids + response_ids) == prompt + response


def test_smollm2s_own_class_name_is_read_as_tokenizer_json(tmp_path: Path) -> None:
    """SmolLM2's tokenizer_config.json names GPT2Tokenizer, which transformers 5 rebuilds from
    the vocabulary without tokenizer.json's digit split: "\\n 4" then gives other ids. ropo reads
    tokenizer.json as it is (the tokenizer the model was trained with), as transformers' generic
    class does; export.py writes that class into final/ (test_export_tokenizer_json.py)."""
    text = "steps:\n 1. read\n 2. think"
    ours = load_tokenizer(smollm2_like(tmp_path / "gpt2", tokenizer_class="GPT2Tokenizer"))
    backend = Backend.from_file(str(ours.model_file))  # the file alone, no config
    assert ours.encode(text) == backend.encode(text, add_special_tokens=False).ids
    generic = hf_tokenizer(smollm2_like(tmp_path / "generic"))
    assert generic.encode(text, add_special_tokens=False) == ours.encode(text)
    gpt2 = hf_tokenizer(ours.model_file.parent)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert gpt2.encode(text, add_special_tokens=False) != ours.encode(text)
