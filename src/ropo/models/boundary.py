"""Where a prompt ends and its response begins: the rules both tokenizers share.

Used by tokenizer.py (sentencepiece) and hf_tokenizer.py (tokenizer.json) when they split a pair
into prompt ids and response ids. Two kinds of text reach them:
  * plain text (a named template of chat_templates.py, or none): the tokenizer adds BOS and EOS,
    the literal markers "<s>" / "</s>" in a prompt stand for BOS / EOS, and `join_at_boundary`
    decides the one space between prompt and response;
  * text a model's own chat template rendered: it holds every special token already, so the
    tokenizer adds none, and `split_after_prompt` cuts the ids where the prompt's ids end.
"""

from __future__ import annotations

import re
from collections.abc import Callable

BOS_TEXT = "<s>"
EOS_TEXT = "</s>"
TURN_MARKERS = re.compile(f"({re.escape(BOS_TEXT)}|{re.escape(EOS_TEXT)})")


def join_at_boundary(prompt: str, response: str) -> tuple[str, str]:
    """(prompt body, response text) of a plain-text pair. Trailing spaces of the prompt move to the
    response, so the prompt's ids depend on the prompt alone; one space joins the two unless either
    side has whitespace at the boundary ("[/INST]" + "Paris" reads "[/INST] Paris")."""
    body = prompt.rstrip(" ")
    response = prompt[len(body) :] + response
    needs_space = response != "" and not (body[-1:].isspace() or response[:1].isspace())
    return body, " " * needs_space + response


def check_no_leading_bos(prompt: str) -> None:
    """ValueError if a plain-text prompt starts with a literal BOS: the tokenizer adds BOS as an
    id, so the text's own would be a second one."""
    if prompt.startswith(BOS_TEXT):
        raise ValueError(
            f"prompt starts with a literal {BOS_TEXT!r}: BOS is added as an id, so this "
            f"would give a second BOS; remove it from the text (prompt: {prompt[:40]!r})"
        )


def split_after_prompt(
    prompt_ids: list[int], full_ids: list[int], encode_response: Callable[[], list[int]]
) -> list[int]:
    """The response's ids: what follows `prompt_ids` in `full_ids` (the ids of prompt + response).

    When a token spans the boundary (a byte-level BPE may merge the prompt's last characters with
    the response's first ones), `prompt_ids` is no prefix of `full_ids`; then the prompt keeps the
    ids it has on its own, which every response of the prompt shares, and the response is encoded
    on its own (`encode_response`). Rare: chat templates end the prompt with a special token or a
    newline, where no merge crosses.
    """
    n = len(prompt_ids)
    if full_ids[:n] == prompt_ids:
        return full_ids[n:]
    return encode_response()
