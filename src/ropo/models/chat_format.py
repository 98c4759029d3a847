"""How a conversation becomes prompt text and response text: a named template, or the model's own.

Between the tokenizer and the data: `data.load_pairs` renders every pair with a ChatFormat and
`generate.py` every prompt; `ChatFormat.encode` then hands the text to the tokenizer in the way
the format needs (tokenizer.py). The `template` key chooses:
  * "llama2-chat" | "mistral-instruct" | "plain": ropo's named templates (chat_templates.py), plain
    text to which the tokenizer adds BOS and EOS;
  * "auto" (the default): the model's own `chat_template` (chat_template.jinja, else
    tokenizer_config.json; of a list of templates the one named "default"), rendered with jinja2
    as transformers' apply_chat_template renders it: a sandbox, trim_blocks and lstrip_blocks, loop
    controls, raise_exception, tojson, strftime_now, and the special tokens (bos_token, ...) as
    variables. Prompt = the conversation rendered with add_generation_prompt=True. Response = what
    the template writes after that prompt once the answer is appended as an assistant turn
    (add_generation_prompt=False), end-of-turn tokens included (ChatML: "answer<|im_end|>\\n").
    A model without a chat template gets "plain", with a `note` its command prints once; a
    template that is ropo's own Jinja (a run's final/) gets that named template back.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ropo.models.chat_templates import (
    TEMPLATES,
    format_chat,
    format_response,
    named_template,
    split_turns,
)
from ropo.models.files import read_json, require_regular_file
from ropo.models.tokenizer import Tokenizer

TEMPLATE_CHOICES = ("auto", *TEMPLATES)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as ropo applies it: `template` is a TEMPLATES name, or "auto" for the
    model's own Jinja `jinja` (read from `origin`, rendered with `special_tokens` as variables).
    `note`: what a person should hear about the choice (template=auto found no chat template)."""

    template: str
    jinja: str = ""
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = field(default="", compare=False)  # a file name, for messages
    note: str = field(default="", compare=False)

    def prompt(self, messages: list[dict]) -> str:
        """The prompt text of a conversation that ends with a user turn."""
        if not self.jinja:
            return format_chat(messages, self.template)
        split_turns(messages)  # an optional system turn, then user/assistant, ending on user
        return self._render(messages, add_generation_prompt=True)

    def response(self, messages: list[dict], response: str) -> str:
        """The text that follows `prompt(messages)` when the model answers `response`."""
        if not self.jinja:
            return format_response(response, self.template)
        prompt = self.prompt(messages)
        answered = [*messages, {"role": "assistant", "content": response}]
        full = self._render(answered, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"the chat template of {self.origin} does not render a conversation with its "
                "answer as the prompt it renders with add_generation_prompt=True followed by the "
                "answer, so the response's text is unknown; choose a named template (template="
                f"{' | '.join(TEMPLATES)})"
            )
        return full[len(prompt) :]

    def encode(
        self, tokenizer: Tokenizer, prompt: str, response: str
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of text this format rendered: the model's template wrote
        every special token, so none is added; a named template's text gets BOS and EOS."""
        if self.jinja:
            return tokenizer.encode_templated(prompt, response)
        return tokenizer.encode_prompt_response(prompt, response)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return compile_template(self.jinja).render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as err:  # raise_exception, or a template that breaks
            raise ValueError(f"the chat template of {self.origin}: {err}") from None


PLAIN = ChatFormat("plain")


def load_chat_format(model_dir: Path, template: str, tokenizer: Tokenizer) -> ChatFormat:
    """The ChatFormat of the `template` key for the model in `model_dir` (module docstring).
    Commands print its `note` where their other information goes, not on stderr, which holds
    a user error's one line."""
    if template in TEMPLATES:
        return ChatFormat(template)
    if template != "auto":
        raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATE_CHOICES}")
    found = read_model_template(Path(model_dir))
    if found is None:
        note = (
            f"template=auto: {model_dir} has no chat template (no chat_template.jinja, no "
            "chat_template in tokenizer_config.json); using the plain template"
        )
        return ChatFormat("plain", note=note)
    source, origin = found
    named = named_template(source)
    if named is not None:  # ropo's own Jinja, as export.py writes it into a run's final/
        return ChatFormat(named)
    try:
        compile_template(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{origin}: chat template line {err.lineno}: {err.message}") from None
    return ChatFormat("auto", source, dict(tokenizer.special_tokens), origin)


def read_model_template(model_dir: Path) -> tuple[str, str] | None:
    """(Jinja source, where it was read) of the model's chat template, None when it has none.
    chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        require_regular_file(jinja_file, f"{jinja_file} does not exist")
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.exists():
        return None
    config = read_json(config_file, f"{config_file} does not exist")
    source = config.get("chat_template") if isinstance(config, dict) else None
    origin = f"{config_file} (chat_template)"
    if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(
                f"{config_file}: chat_template lists the templates {sorted(map(str, named))} "
                "but none named 'default'; choose a named template with template=..."
            )
        source, origin = named["default"], f"{config_file} (chat_template 'default')"
    if source is not None and not isinstance(source, str):
        raise ValueError(f"{config_file}: chat_template must be a string or a list of templates")
    return (source, origin) if source else None


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """`source` compiled in the sandbox transformers renders chat templates in (Hub templates
    are untrusted code), with the same options, filters and functions."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which no chat model was trained on.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
