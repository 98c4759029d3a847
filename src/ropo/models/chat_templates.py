"""ropo's chat templates (`format_chat` in tokenizer.py) as the Jinja that Hugging Face reads.

Written into `<out>/final/tokenizer_config.json` by export.py, so that transformers'
`apply_chat_template` renders a conversation as the run rendered its prompts. Each template:
  * starts with `bos_token`, because apply_chat_template tokenises without adding special tokens,
    and every ropo prompt starts with one BOS id;
  * renders a conversation that ends with a user turn as `format_chat` does (the prompt to
    generate from), with `eos_token` / `bos_token` where ropo writes the literal "</s>" / "<s>";
  * renders a final assistant turn as training saw the response: joined by one space unless
    either side has whitespace at the boundary, then `eos_token`;
  * refuses what `format_chat` refuses (roles out of order) with raise_exception.
`add_generation_prompt` changes nothing: ropo's prompt already ends where the response begins.
"""

# Splits `messages` into an optional system text and the turns of the prompt (a final assistant
# message is the response, rendered by _RESPONSE), and checks the roles as _split_turns does.
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
    "{{- bos_token -}}"
)

# The response as training saw it (tokenizer.py's boundary rule); `prompt_end` is the prompt's
# last character, set by the template body.
_RESPONSE = (
    "{%- if messages[-1]['role'] == 'assistant' -%}"
    "{%- set response = messages[-1]['content'] -%}"
    "{%- set joint = '' if prompt_end.isspace() or response[:1].isspace() else ' ' -%}"
    "{{- joint + response + eos_token -}}"
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

JINJA_TEMPLATES = {
    "llama2-chat": _TURNS + _LLAMA2_CHAT + _RESPONSE,
    "mistral-instruct": _TURNS + _MISTRAL_INSTRUCT + _RESPONSE,
    "plain": _TURNS + _PLAIN + _RESPONSE,
}
