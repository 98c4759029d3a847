"""Preference pairs rendered with a model's own chat template (template=auto): the pair holds the
rendered prompt and responses, tokenises as the template wrote it, and errors name file:line;
rejection-sampled pairs keep their ids, whatever their decoded text lost.
"""

import json
from pathlib import Path

import pytest

from ropo.data import TokenizedPair, inject_noise, load_pairs, tokenize_pairs
from ropo.filter.rejection import SampledPair
from ropo.models.chat_format import ChatFormat, load_chat_format
from ropo.models.tokenizer import Tokenizer, load_tokenizer
from ropo.resample import sampled_record
from test_data import GOOD, sha_id, write_jsonl
from tokenizer_fixtures import smollm2_like


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, ChatFormat]:
    """A SmolLM2-like tokenizer.json model and its own ChatML template (template=auto)."""
    model_dir = smollm2_like(tmp_path_factory.mktemp("smollm2"))
    tokenizer = load_tokenizer(model_dir)
    return tokenizer, load_chat_format(model_dir, "auto", tokenizer)


def test_model_template_renders_prompt_and_responses(
    tmp_path: Path, smollm2: tuple[Tokenizer, ChatFormat]
) -> None:
    """With the model's template a pair holds the rendered prompt and each rendered response
    (end of turn included); the id hashes the responses as the record has them."""
    tokenizer, chat = smollm2
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    (p,), _ = load_pairs(path, chat=chat)
    assert p.prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert (p.chosen, p.rejected) == ("4<|im_end|>\n", "5<|im_end|>\n")
    assert p.id == sha_id(p.prompt, "4", "5")
    (t,), _ = tokenize_pairs([p], tokenizer, max_length=512, chat=chat)
    end_of_turn = tokenizer.encode("<|im_end|>\n")
    assert list(t.prompt_ids) == tokenizer.encode(p.prompt)  # no BOS added: SmolLM2 has none
    assert list(t.chosen_ids) == tokenizer.encode("4") + end_of_turn
    assert list(t.rejected_ids) == tokenizer.encode("5") + end_of_turn
    (flipped,), _ = inject_noise([p], noise=0.49, seed=3)
    (u,), _ = tokenize_pairs([flipped], tokenizer, max_length=512, chat=chat)
    assert (u.chosen_ids, u.rejected_ids) == (t.rejected_ids, t.chosen_ids)  # swapped whole


def test_model_template_errors_name_the_line(
    tmp_path: Path, smollm2: tuple[Tokenizer, ChatFormat]
) -> None:
    _, chat = smollm2
    strict = ChatFormat("auto", "{{ raise_exception('no system turns') if messages[0]['role'] "
                        "== 'system' }}", chat.special_tokens, "strict.jinja")  # fmt: skip
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hi"}
    record = {
        "chosen": [system, user, {"role": "assistant", "content": "a"}],
        "rejected": [system, user, {"role": "assistant", "content": "b"}],
    }
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, record])
    with pytest.raises(ValueError, match=f"{path}:2: the chat template of strict.jinja: no system"):
        load_pairs(path, chat=strict)


def test_sampled_pairs_keep_their_ids_not_their_text(smollm2: tuple[Tokenizer, ChatFormat]) -> None:
    """Rejection sampling stores the sampled ids and, for people, their decoded text, which
    drops special tokens: the pair trained on next round is rebuilt from the ids."""
    tokenizer, _ = smollm2
    prompt_ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    chosen_ids, rejected_ids = tokenizer.encode("Paris<|im_end|>"), tokenizer.encode("Lyon")
    tokens = TokenizedPair("s1", tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids))
    record = sampled_record(SampledPair(tokens, 1, -1.5, -2.5), tokenizer)  # sampled_pairs.jsonl
    assert record["chosen"] == tokenizer.decode(chosen_ids)
    assert tokenizer.encode(record["chosen"]) != chosen_ids  # the text lost <|im_end|>
    rebuilt = SampledPair.from_record(json.loads(json.dumps(record)))
    assert rebuilt.tokens == TokenizedPair(
        "s1", tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids)
    )
    assert rebuilt == SampledPair(tokens, 1, -1.5, -2.5)
