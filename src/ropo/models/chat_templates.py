"""ropo's named chat templates: in Python for training, and as the Jinja that Hugging Face reads.

`chat_format.py` renders conversations with `format_chat` / `format_response` when the template
key names one of TEMPLATES; the tokenizer then adds BOS and EOS (tokenizer.py). Between turns the
text carries the literal markers "</s><s>" (llama2-chat) or "</s>" (mistral-instruct) where
Meta's and mistral-common's encoders put EOS/BOS ids, and each tokenizer maps them to its ids.

`jinja_template` gives the same formats as Jinja, which export.py writes into
`<out>/final/tokenizer_config.json`, so that transformers' `apply_chat_template` renders a
conversation as the run rendered its prompts. Each Jinja template:
  * starts with `bos_token` when the tokenizer starts plain text with a BOS id, because
    apply_chat_template tokenises without adding special tokens;
  * renders a conversation that ends with a user turn as `format_chat` does (the prompt to
    generate from), with `eos_token` / `bos_token` where ropo writes the literal "</s>" / "<s>";
  * renders a final assistant turn as training saw the response, then `eos_token`;
  * refuses what `format_chat` refuses (roles out of order) with raise_exception.
`add_generation_prompt` changes nothing: ropo's prompt already ends where the response begins.
"""

from __future__ import annotations

from ropo.models.boundary import BOS_TEXT, EOS_TEXT

TEMPLATES = ("llama2-chat", "mistral-instruct", "plain")


def format_chat(messages: list[dict], template: str) -> str:
    """The prompt text of a conversation that ends with a user turn (the response is not included).

    `messages`: [{"role", "content"}], an optional leading "system", then user/assistant turns.
    The leading BOS is never written (the tokenizer adds it as an id). llama2-chat strips each
    turn as Meta's encoder does; mistral-instruct keeps text verbatim as mistral-common does;
    "plain" renders a lone user turn verbatim, anything longer as a User:/Assistant: transcript.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
    system, users, assistants = split_turns(messages)
    if template == "llama2-chat":
        if system is not None:  # Meta folds the system prompt into the first user turn
            users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
        turns = [
            f"[INST] {u.strip()} [/INST] {a.strip()} {EOS_TEXT}{BOS_TEXT}"
            for u, a in zip(users, assistants, strict=False)
        ]
        return "".join(turns) + f"[INST] {users[-1].strip()} [/INST]"
    if template == "mistral-instruct":
        if system is not None:  # v0.1/v0.2 have no system role; mistral-common prepends it
            users[0] = f"{system}\n\n{users[0]}"
        turns = [
            f"[INST] {u} [/INST] {a}{EOS_TEXT}" for u, a in zip(users, assistants, strict=False)
        ]
        return "".join(turns) + f"[INST] {users[-1]} [/INST]"
    if system is None and len(users) == 1:
        return users[0]
    lines = [] if system is None else [f"System: {system}"]
    for u, a in zip(users, assistants, strict=False):
        lines += [f"User: {u}", f"Assistant: {a}"]
    return "\n\n".join(lines + [f"User: {users[-1]}", "Assistant:"])


def format_response(response: str, template: str) -> str:
    """The response text as `template` puts it after its prompt. mistral-instruct starts it with
    a space, as earlier answers: mistral-common encodes every answer on its own, with
    sentencepiece's dummy prefix "▁" even before a leading space or newline. The other templates
    leave it to the tokenizer's boundary rule (one joining space unless there is whitespace)."""
    return " " + response if template == "mistral-instruct" else response


def split_turns(messages: list[dict]) -> tuple[str | None, list[str], list[str]]:
    """(system or None, user contents, assistant contents); roles must alternate, ending on user."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'content'")
    roles = [m.get("role") for m in messages]
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            raise ValueError(f"messages[{i}]: role {roles[i]!r}, expected {expected!r}")
    if roles[-1] != "user":
        raise ValueError("the conversation must end with a user turn (the response is not in it)")
    contents = [m["content"] for m in messages[start:]]
    system = messages[0]["content"] if start else None
    return system, contents[0::2], contents[1::2]


# Splits `messages` into an optional system text and the turns of the prompt (a final assistant
# message is the response, rendered by _RESPONSE_*), and checks the roles as split_turns does.
_TURNS = (
    "{%- set turns = messages[:-1] if messages and messages[-1]['role'] == 'assistant' "
    "else messages -%}"
    "{%- set system = turns[0]['content'] if turns and turns[0]['role'] == 'system' else none -%}"
    "{%- set turns = turns[1:] if system is not none else turns -%}"
    "{%- if not turns or turns[-1]['role'] != 'user' -%}"
    "{{- raise_exception('the prompt must end with a user turn') -}}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('roles must alternate user/assistant after an optional system') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# The response as training saw it (boundary.py's rule: one joining space unless there is
# whitespace at the boundary); `prompt_end` is the prompt's last character, set by the body.
_RESPONSE_JOINED = (
    "{%- if messages[-1]['role'] == 'assistant' -%}"
    "{%- set response = messages[-1]['content'] -%}"
    "{%- set joint = '' if prompt_end.isspace() or response[:1].isspace() else ' ' -%}"
    "{{- joint + response + eos_token -}}"
    "{%- endif -%}"
)

# The response after one space, whatever it starts with (format_response).
_RESPONSE_AFTER_SPACE = (
    "{%- if messages[-1]['role'] == 'assistant' -%}"
    "{{- ' ' + messages[-1]['content'] + eos_token -}}"
    "{%- endif -%}"
)

# Meta's Llama-2 chat format: the system prompt folded into the first user turn, every turn
# stripped, "</s><s>" after each earlier answer.
_LLAMA2_CHAT = (
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content -%}"
    "{%- endif -%}"
    "{{- '[INST] ' + content.strip() + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + message['content'].strip() + ' ' + eos_token + bos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set prompt_end = ']' -%}"
)

# Mistral-Instruct v0.1/v0.2: text verbatim, "</s>" after each earlier answer, the system text
# (which these versions lack) put before the first user turn.
_MISTRAL_INSTRUCT = (
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = system + '\\n\\n' + content -%}"
    "{%- endif -%}"
    "{{- '[INST] ' + content + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set prompt_end = ']' -%}"
)

# A lone user turn verbatim; anything longer as a User:/Assistant: transcript.
_PLAIN = (
    "{%- if system is none and turns | length == 1 -%}"
    "{{- turns[0]['content'] -}}"
    "{%- set prompt_end = turns[0]['content'][-1:] -%}"
    "{%- else -%}"
    "{%- if system is not none -%}{{- 'System: ' + system + '\\n\\n' -}}{%- endif -%}"
    "{%- for message in turns -%}"
    "{{- ('User: ' if message['role'] == 'user' else 'Assistant: ') + message['content'] -}}"
    "{{- '\\n\\n' -}}"
    "{%- endfor -%}"
    "{{- 'Assistant:' -}}"
    "{%- set prompt_end = ':' -%}"
    "{%- endif -%}"
)

_BODIES = {
    "llama2-chat": (_LLAMA2_CHAT, _RESPONSE_JOINED),
    "mistral-instruct": (_MISTRAL_INSTRUCT, _RESPONSE_AFTER_SPACE),
    "plain": (_PLAIN, _RESPONSE_JOINED),
}


def jinja_template(template: str, bos: bool) -> str:
    """The Jinja of named `template`; `bos`: whether the tokenizer starts plain text with a BOS
    id, which the Jinja then writes as `bos_token` (apply_chat_template adds no special token)."""
    body, response = _BODIES[template]
    return _TURNS + "{{- bos_token -}}" * bos + body + response


def named_template(source: str) -> str | None:
    """The name of the template whose Jinja `source` is, as export.py writes it, else None: a
    run's final/ then reads back with the template it was trained with."""
    for template in TEMPLATES:
        if source in (jinja_template(template, bos=True), jinja_template(template, bos=False)):
            return template
    return None
