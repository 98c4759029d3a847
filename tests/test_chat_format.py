"""template=auto: the model's own chat template renders and tokenises as transformers'
apply_chat_template does; where it is read from; what happens without one; errors name the file.

The models are the tiny tokenizer.json fixtures of tokenizer_fixtures.py: SmolLM2-like (ChatML,
no BOS) and Llama-3-like (a template that writes {{ bos_token }} and trims every turn).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ropo import config
from ropo.models.chat_format import PLAIN, TEMPLATE_CHOICES, ChatFormat, load_chat_format
from ropo.models.chat_templates import jinja_template
from ropo.models.tokenizer import Tokenizer, load_tokenizer
from tokenizer_fixtures import SMOLLM2_TEMPLATE, llama3_like, smollm2_like, tiny_tokenizer

transformers = pytest.importorskip("transformers")

BUILDERS: dict[str, Callable[[Path], Path]] = {"smollm2": smollm2_like, "llama3": llama3_like}
SYSTEM = {"role": "system", "content": "You answer in one word. "}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [SYSTEM, {"role": "user", "content": " café, 東京 and 😀?\n"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "def f(x):\n\treturn x  # what does it do?"},
    ],
    [
        SYSTEM,
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 12345 * 3?"},
    ],
]
ANSWERS = ["Paris", " Paris ", "\nParis", "```python\nprint(1)\n```\n", "😀", ""]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Tokenizer, ChatFormat]:
    model_dir = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    tokenizer = load_tokenizer(model_dir)
    return model_dir, tokenizer, load_chat_format(model_dir, "auto", tokenizer)


def hf_tokenizer(path: Path) -> object:
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path))


def apply_chat_template(hf: object, messages: list[dict], **kwargs: object) -> list[int]:
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def test_prompts_and_responses_are_apply_chat_templates(
    model: tuple[Path, Tokenizer, ChatFormat],
) -> None:
    """Single- and multi-turn, with and without a system turn: the prompt is the text and ids of
    apply_chat_template(add_generation_prompt=True), prompt + response ids are its ids of the
    conversation that ends with the answer."""
    model_dir, tokenizer, chat = model
    hf = hf_tokenizer(model_dir)
    assert chat.template == "auto"
    for messages in CONVERSATIONS:
        prompt = chat.prompt(messages)
        assert prompt == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        generation_ids = apply_chat_template(hf, messages, add_generation_prompt=True)
        for answer in ANSWERS:
            prompt_ids, response_ids = chat.encode(
                tokenizer, prompt, chat.response(messages, answer)
            )
            assert prompt_ids == generation_ids
            answered = [*messages, {"role": "assistant", "content": answer}]
            assert prompt_ids + response_ids == apply_chat_template(hf, answered), answer


def test_a_token_across_the_boundary_leaves_the_prompt_its_ids(tmp_path: Path) -> None:
    """SmolLM2 splits digits off before its byte-level split, so in "assistant\\n" + " 4" the
    "\\n " becomes one token and apply_chat_template's ids of the answered conversation do not
    start with the prompt's ids. ropo keeps the prompt's ids (both responses of a pair share them,
    and generation starts from them) and encodes the response on its own: only the boundary
    differs (boundary.split_after_prompt)."""
    model_dir = smollm2_like(tmp_path)
    tokenizer, hf = load_tokenizer(model_dir), hf_tokenizer(model_dir)
    chat = load_chat_format(model_dir, "auto", tokenizer)
    messages = CONVERSATIONS[0]
    prompt, response = chat.prompt(messages), chat.response(messages, " 4")
    prompt_ids, response_ids = chat.encode(tokenizer, prompt, response)
    whole = apply_chat_template(hf, [*messages, {"role": "assistant", "content": " 4"}])
    assert prompt_ids == apply_chat_template(hf, messages, add_generation_prompt=True)
    assert whole[: len(prompt_ids)] != prompt_ids  # the merge this test is about
    assert response_ids == tokenizer.encode(response)
    assert tokenizer.decode(prompt_ids + response_ids) == tokenizer.decode(whole)


def test_the_response_carries_the_templates_end_of_turn(tmp_path: Path) -> None:
    smol_dir, llama_dir = smollm2_like(tmp_path / "smol"), llama3_like(tmp_path / "llama")
    smol = load_chat_format(smol_dir, "auto", load_tokenizer(smol_dir))
    llama_tokenizer = load_tokenizer(llama_dir)
    llama = load_chat_format(llama_dir, "auto", llama_tokenizer)
    question = CONVERSATIONS[0]
    assert smol.prompt(question).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert smol.response(question, " Paris ") == " Paris <|im_end|>\n"
    assert llama.response(question, " Paris ") == "Paris<|eot_id|>"  # the template trims
    prompt = llama.prompt(question)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user")  # {{ bos_token }}
    prompt_ids, _ = llama.encode(llama_tokenizer, prompt, "Paris<|eot_id|>")
    assert prompt_ids.count(llama_tokenizer.bos_id) == 1  # the template's, none added


def test_without_a_chat_template_auto_is_plain_with_a_note(tmp_path: Path) -> None:
    """The note goes where each command prints its information (train: standard output), never
    on stderr, where a user error is the one line."""
    model_dir = smollm2_like(tmp_path)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(model_dir)
    chat = load_chat_format(model_dir, "auto", tokenizer)
    assert chat == PLAIN
    assert chat.note == (
        f"template=auto: {model_dir} has no chat template (no chat_template.jinja, no "
        "chat_template in tokenizer_config.json); using the plain template"
    )
    assert load_chat_format(model_dir, "llama2-chat", tokenizer).note == ""


def test_where_the_template_is_read_from(tmp_path: Path) -> None:
    """chat_template.jinja wins over tokenizer_config.json (as in transformers); of a list of
    named templates the one named "default" is used; ropo's own Jinja (written into a run's
    final/) reads back as the named template it renders."""
    model_dir = smollm2_like(tmp_path)
    tokenizer = load_tokenizer(model_dir)
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"}]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{config_file}: chat_template lists .*'tool_use'"):
        load_chat_format(model_dir, "auto", tokenizer)
    config["chat_template"].append({"name": "default", "template": "{{ messages[0]['content'] }}!"})
    config_file.write_text(json.dumps(config))
    chat = load_chat_format(model_dir, "auto", tokenizer)
    assert chat.prompt(CONVERSATIONS[0]) == "What is the capital of France?!"
    assert chat.origin == f"{config_file} (chat_template 'default')"
    (model_dir / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)
    chat = load_chat_format(model_dir, "auto", tokenizer)
    assert chat.jinja == SMOLLM2_TEMPLATE and chat.origin == str(model_dir / "chat_template.jinja")
    (model_dir / "chat_template.jinja").write_text(jinja_template("mistral-instruct", bos=False))
    assert load_chat_format(model_dir, "auto", tokenizer) == ChatFormat("mistral-instruct")


def write_template(model_dir: Path, template: str) -> None:
    (model_dir / "chat_template.jinja").write_text(template)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}[answer]{% endif %}",
            "does not render a conversation with its answer as the prompt",
        ),
        (
            "{% if messages[0]['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}",
            "System role not supported",
        ),
        ("{% set _ = messages.append({}) %}", "unsafe"),  # the sandbox: messages are read-only
    ],
)
def test_template_errors_name_the_template(tmp_path: Path, template: str, message: str) -> None:
    model_dir = smollm2_like(tmp_path)
    write_template(model_dir, template)
    chat = load_chat_format(model_dir, "auto", load_tokenizer(model_dir))
    with pytest.raises(ValueError, match=message) as error:
        chat.response([SYSTEM, {"role": "user", "content": "hi"}], "ok")
    assert f"the chat template of {model_dir / 'chat_template.jinja'}" in str(error.value)


def test_a_broken_template_is_refused_when_loaded(tmp_path: Path) -> None:
    model_dir = smollm2_like(tmp_path)
    write_template(model_dir, "{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(
        ValueError, match=f"{model_dir / 'chat_template.jinja'}: chat template line"
    ):
        load_chat_format(model_dir, "auto", load_tokenizer(model_dir))
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        load_chat_format(model_dir, "chatml", load_tokenizer(model_dir))


def test_template_functions_are_transformers(tmp_path: Path) -> None:
    """tojson without HTML escapes, strftime_now, loop controls, trim_blocks/lstrip_blocks and
    the special tokens as variables render as apply_chat_template renders them."""
    model_dir = smollm2_like(tmp_path)
    template = (
        "{{ bos_token }}{{ messages | tojson }}\n"
        "  {% for m in messages %}\n"
        "    {% if loop.index0 > 1 %}{% break %}{% endif %}\n"
        "    {{- m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}\n"
        "  {% endfor %}\n"
        "{% if add_generation_prompt %}{{ strftime_now('%Y') }}|{{ unk_token }}{% endif %}"
    )
    write_template(model_dir, template)
    chat = load_chat_format(model_dir, "auto", load_tokenizer(model_dir))
    messages = [{"role": "user", "content": " <b>&'\"</b> 東京 "}]
    expected = hf_tokenizer(model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert chat.prompt(messages) == expected
    assert "<b>&'" in expected and "東京" in expected  # not escaped


LLAMA2_CHAT_TEMPLATE = (  # Llama-2-7b-chat-hf's own
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def test_a_sentencepiece_model_with_its_own_template(tmp_path: Path) -> None:
    """An HF Llama-2-chat folder: tokenizer.model and Meta's template in tokenizer_config.json.
    Its "<s>" / "</s>" become BOS / EOS ids and the text between is encoded as Meta's
    chat_completion encodes each turn: encode(f"[INST] {user} [/INST] {answer} ") + [EOS]."""
    tokenizer = tiny_tokenizer(tmp_path)
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_CHAT_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = load_chat_format(tmp_path, "auto", tokenizer)
    messages = [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    prompt = chat.prompt(messages)
    prompt_ids, response_ids = chat.encode(tokenizer, prompt, chat.response(messages, " Four. "))
    first = f"[INST] <<SYS>>\n{SYSTEM['content']}\n<</SYS>>\n\nHi [/INST] Hello! "
    last = "[INST] What is 2+2? [/INST]"
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    earlier = [bos] + tokenizer.encode(first) + [eos, bos]
    assert prompt_ids == earlier + tokenizer.encode(last)
    assert prompt_ids + response_ids == earlier + tokenizer.encode(f"{last} Four. ") + [eos]


def test_the_template_key_offers_what_chat_format_knows() -> None:
    # config.py keeps its own tuple so that `ropo keys` and --help need no torch import.
    assert set(config.TEMPLATES) == set(TEMPLATE_CHOICES)
