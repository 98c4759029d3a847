"""`ropo generate`: greedy equals transformers' greedy, the judge files have the fields their tools
read, prompts are read and tokenised as training reads them, and user errors are one line.

The CLI tests run `python -m ropo generate` in a fresh process, as a user would. The sampler itself
is tested in test_generate.py; here it is the command around it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import read_jsonl
from model_fixtures import count_packings, packable_model
from ropo.config_load import load_settings
from ropo.data import load_pairs, tokenize_pairs
from ropo.generate import GenerationStats, answer, prompt_ids, run_generate
from ropo.generate_config import GenerateSettings
from ropo.generate_layouts import Response
from ropo.generate_prompts import PromptRecord, read_prompts
from ropo.models import load_model, load_tokenizer
from ropo.models.chat_format import PLAIN, ChatFormat
from ropo.models.chat_templates import format_chat
from ropo.models.sample import generate

# Four lengths and a blank line: with batch_size=3 one batch pads three different lengths.
TEXT_PROMPTS = (
    "Question: apple\n"
    "\n"
    "fox golf hotel india juliet kilo lima mike Answer:\n"
    "Question: delta echo\n"
    "tango uniform\n"
)
MAX_NEW = 10


def ropo_generate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m ropo generate ARGS` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ropo", "generate", "device=cpu", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def eos_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its EOS row of the LM head made 1.1 x the row of a token that greedy
    decoding emits early: EOS wins where that token would, so some rows stop and some run out."""
    tokenizer = load_tokenizer(tiny_model_dir)
    first = prompt_ids(tokenizer, TEXT_PROMPTS.splitlines()[0])
    early_token = generate(load_model(tiny_model_dir), [first], 4, temperature=0)[0][3]
    model_dir = tmp_path_factory.mktemp("eos_model") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    weights["lm_head.weight"][tokenizer.eos_id] = 1.1 * weights["lm_head.weight"][early_token]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


@torch.no_grad()
def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The oracle: AutoModelForCausalLM's greedy generate, one unpadded prompt at a time."""
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager"
    ).eval()
    tokenizer = load_tokenizer(model_dir)
    new_ids = []
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
        new_ids.append(out[0, len(ids) :].tolist())
    return new_ids


def settings(**values: object) -> GenerateSettings:
    return GenerateSettings(**({"device": "cpu", "max_new_tokens": MAX_NEW} | values))


def test_greedy_cli_equals_transformers_greedy(eos_model_dir: Path, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(TEXT_PROMPTS)
    out = tmp_path / "out.jsonl"
    args = [f"model={eos_model_dir}", f"prompts={prompts_file}", f"out={out}"]
    result = ropo_generate([*args, f"max_new_tokens={MAX_NEW}", "batch_size=3"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 blank line" in result.stdout

    lines = [line for line in TEXT_PROMPTS.splitlines() if line]
    tokenizer = load_tokenizer(eos_model_dir)
    expected = transformers_greedy(eos_model_dir, [prompt_ids(tokenizer, p) for p in lines])
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [1, 3, 4, 5]  # line numbers; line 2 is blank
    for record, prompt, ids in zip(records, lines, expected, strict=True):
        stopped = ids[-1] == tokenizer.eos_id
        assert record == {
            "id": record["id"],
            "prompt": prompt,
            "output": tokenizer.decode(ids),
            "generator": "model",
            "n_tokens": len(ids),
            "finish_reason": "stop" if stopped else "length",
        }
    assert {r["finish_reason"] for r in records} == {"stop", "length"}  # both paths were taken


def test_greedy_tokens_equal_transformers_greedy(eos_model_dir: Path, tmp_path: Path) -> None:
    """The same, token for token, through the function the command calls."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(TEXT_PROMPTS)
    tokenizer = load_tokenizer(eos_model_dir)
    records = read_prompts(prompts_file, multi_turn=False).records
    cfg = settings(model=str(eos_model_dir), prompts="-", out="-", batch_size=3)
    model = load_model(eos_model_dir)
    conversations = answer(model, tokenizer, PLAIN, records, cfg, GenerationStats())
    ours = [list(c.responses[0].token_ids) for c in conversations]
    lines = [line for line in TEXT_PROMPTS.splitlines() if line]
    assert ours == transformers_greedy(eos_model_dir, [prompt_ids(tokenizer, p) for p in lines])


def test_prompt_ids_are_those_of_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A chat record gets the ids `ropo train` gives the prompt of a pair with the same turns."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "apple banana"},
        {"role": "assistant", "content": "cherry"},
        {"role": "user", "content": "delta echo "},
    ]
    pair = {
        "chosen": [*messages, {"role": "assistant", "content": "fox"}],
        "rejected": [*messages, {"role": "assistant", "content": "golf"}],
    }
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    tokenizer = load_tokenizer(tiny_model_dir)
    for template in ("plain", "llama2-chat", "mistral-instruct"):
        pairs, _ = load_pairs(tmp_path / "pairs.jsonl", chat=ChatFormat(template))
        trained, _ = tokenize_pairs(pairs, tokenizer, max_length=256)
        record = read_prompts(tmp_path / "prompts.jsonl", multi_turn=False).records[0]
        rendered = format_chat(list(record.messages), template)
        assert prompt_ids(tokenizer, rendered) == list(trained[0].prompt_ids), template


def test_alpaca_eval_file_has_the_fields_alpaca_eval_reads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """AlpacaEval's own prompt file (a JSON list with a reference model's output) in, its
    model_outputs list out: instruction, output, generator and the dataset carried over."""
    reference = [
        {"instruction": "apple banana", "output": "x", "generator": "gpt4", "dataset": "helpful"},
        {"instruction": "kilo lima mike", "output": "y", "generator": "gpt4", "dataset": "oasst"},
    ]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(reference))
    out = tmp_path / "outputs.json"
    args = [f"model={tiny_model_dir}", f"prompts={tmp_path / 'alpaca_eval.json'}", f"out={out}"]
    result = ropo_generate([*args, "layout=alpaca_eval", "generator=ropo-tiny", "max_new_tokens=6"],
                           tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    outputs = json.loads(out.read_text())
    assert [sorted(o) for o in outputs] == [["dataset", "generator", "instruction", "output"]] * 2
    assert [o["instruction"] for o in outputs] == ["apple banana", "kilo lima mike"]
    assert [o["dataset"] for o in outputs] == ["helpful", "oasst"]
    assert {o["generator"] for o in outputs} == {"ropo-tiny"}
    cfg = settings(model=str(tiny_model_dir), prompts="-", out="-", max_new_tokens=6)
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    for output in outputs:
        ids = prompt_ids(tokenizer, output["instruction"])
        new = generate(model, [ids], cfg.max_new_tokens, temperature=0, eos_id=tokenizer.eos_id)
        assert output["output"] == tokenizer.decode(new[0])


def test_mt_bench_answers_each_turn_after_the_last(tiny_model_dir: Path, tmp_path: Path) -> None:
    """MT-Bench's question.jsonl in, its answer JSONL out; turn 2 is asked in the conversation
    that holds the model's own turn-1 answer, rendered with the chat template."""
    questions = [
        {"question_id": 81, "category": "writing", "turns": ["apple banana", "now kilo lima"]},
        {"question_id": 82, "category": "math", "turns": ["fox golf hotel india"]},
    ]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "model_answer" / "tiny.jsonl"
    args = [f"model={tiny_model_dir}", f"prompts={tmp_path / 'question.jsonl'}", f"out={out}"]
    result = ropo_generate(
        [*args, "layout=mt_bench", "template=llama2-chat", "max_new_tokens=6"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    answers = read_jsonl(out)
    fields = ["answer_id", "choices", "model_id", "question_id", "tstamp"]
    assert [sorted(a) for a in answers] == [fields, fields]
    assert [a["question_id"] for a in answers] == [81, 82]
    assert {a["model_id"] for a in answers} == {"model"}
    assert [[sorted(c) for c in a["choices"]] for a in answers] == [[["index", "turns"]]] * 2
    assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 1]

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)

    def greedy(messages: list[dict]) -> str:
        ids = prompt_ids(tokenizer, format_chat(messages, "llama2-chat"))
        return tokenizer.decode(generate(model, [ids], 6, temperature=0, eos_id=2)[0])

    turn1, turn2 = answers[0]["choices"][0]["turns"]
    first = {"role": "user", "content": "apple banana"}
    second = {"role": "user", "content": "now kilo lima"}
    assert turn1 == greedy([first])
    assert turn2 == greedy([first, {"role": "assistant", "content": turn1}, second])


def test_mt_bench_turn_two_prompt_holds_the_conversation(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny random model answers mostly from the last tokens, so the outputs above barely
    depend on the history; here the prompts handed to the sampler are checked directly."""
    question = {"question_id": 1, "turns": ["apple banana", "now kilo lima"]}
    (tmp_path / "question.jsonl").write_text(json.dumps(question) + "\n")
    seen: list[list[list[int]]] = []

    def recording_generate(model: object, prompts: list[list[int]], *args, **kwargs):
        seen.append(prompts)
        return generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr("ropo.models.responses.generate", recording_generate)
    records = read_prompts(tmp_path / "question.jsonl", multi_turn=True).records
    cfg = settings(model="-", prompts="-", out="-", template="mistral-instruct", max_new_tokens=4)
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    chat = ChatFormat("mistral-instruct")
    [conversation] = answer(model, tokenizer, chat, records, cfg, GenerationStats())
    turn1 = conversation.responses[0].text
    history = [
        {"role": "user", "content": "apple banana"},
        {"role": "assistant", "content": turn1},
        {"role": "user", "content": "now kilo lima"},
    ]
    assert seen == [
        [prompt_ids(tokenizer, format_chat(history[:1], "mistral-instruct"))],
        [prompt_ids(tokenizer, format_chat(history, "mistral-instruct"))],
    ]


def test_sampling_n_per_prompt_is_seeded(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"id": "a", "prompt": "apple"}) + "\n" + json.dumps({"prompt": "fox"}) + "\n"
    )

    def sample(seed: int, name: str) -> list[dict]:
        out = tmp_path / name
        cfg = settings(model=str(tiny_model_dir), prompts=str(tmp_path / "prompts.jsonl"),
                       out=str(out), n=3, temperature=1.0, top_p=0.9, seed=seed)  # fmt: skip
        run_generate(cfg)
        return read_jsonl(out)

    first, again, other = sample(0, "a.jsonl"), sample(0, "b.jsonl"), sample(1, "c.jsonl")
    assert [(r["id"], r["sample"]) for r in first] == [("a", 0), ("a", 1), ("a", 2),
                                                       (2, 0), (2, 1), (2, 2)]  # fmt: skip
    assert first == again
    assert [r["output"] for r in first] != [r["output"] for r in other]
    assert len({r["output"] for r in first[:3]}) > 1  # the samples of one prompt differ


def test_no_row_runs_past_the_models_positions(tiny_model_dir: Path) -> None:
    """In one batch: a short prompt gets max_new_tokens, one near the model's 256 positions gets
    what is left, and one beyond them gets no answer; all three are reported, none dropped."""
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    positions = model.config.max_position_embeddings
    texts = (" ".join(["apple"] * k) for k in range(1, 1000))
    near = next(t for t in texts if positions - 6 <= len(prompt_ids(tokenizer, t)) < positions)
    beyond = " ".join(["apple"] * 1000)
    records = [
        PromptRecord(i, ({"role": "user", "content": text},), (), f"test:{i}")
        for i, text in enumerate(["tango", near, beyond])
    ]
    stats = GenerationStats()
    cfg = settings(model="-", prompts="-", out="-", batch_size=3)
    conversations = answer(model, tokenizer, PLAIN, records, cfg, stats)
    short, cut, skipped = (c.responses[0] for c in conversations)
    assert len(short.token_ids) == MAX_NEW
    assert len(cut.token_ids) == positions - len(prompt_ids(tokenizer, near))
    assert (cut.finish_reason, skipped) == ("length", Response((), "", "prompt_too_long"))
    assert stats.position_limited == 1 and stats.finish["prompt_too_long"] == 1


def test_prompt_records(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"id": "q1", "prompt": "apple"}\n\n'
        '{"messages": [{"role": "user", "content": "fox"}], "dataset": "d"}\n'
        '{"instruction": "kilo"}\n'
    )
    records = read_prompts(path, multi_turn=False).records
    assert [r.id for r in records] == ["q1", 3, 4]
    assert [r.messages[-1]["content"] for r in records] == ["apple", "fox", "kilo"]
    assert [r.dataset for r in records] == [None, "d", None]
    problems = {
        '{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n': ":2: duplicate id 'x'",
        '{"prompt": "a", "messages": []}\n': ":1: a prompt record needs exactly one",
        '{"text": "a"}\n': ":1: a prompt record needs exactly one",
        '{"prompt": "  "}\n': ":1: field 'prompt' must be a non-empty string",
        '{"turns": ["a", "b"]}\n': ":1: field 'turns' makes this an MT-Bench question",
    }
    for text, message in problems.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts(path, multi_turn=False)
    text_file = tmp_path / "prompts.txt"
    text_file.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="prompts.txt:1: this line is a JSON object"):
        read_prompts(text_file, multi_turn=False)


def test_settings_are_checked_with_their_key_names() -> None:
    base = ["model=m", "prompts=p", "out=o"]
    cases = {
        "n=2": "'n' = 2 with temperature=0",
        "top_p=0": "command line 'top_p=0': config key 'top_p' = 0.0 must be > 0.0",
        "max_new_tokens=many": "'max_new_tokens' expects int",
    }
    for word, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_settings(GenerateSettings, [*base, word], "ropo generate")
    with pytest.raises(ValueError, match="config key 'out' is required"):
        load_settings(GenerateSettings, base[:2], "ropo generate")
    cfg = load_settings(GenerateSettings, [*base, "temperature=1", "n=2"], "ropo generate")
    assert cfg.temperature == 1.0 and isinstance(cfg.temperature, float) and cfg.n == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_prompts", "prompts file {tmp}/nope.jsonl does not exist"),
        ("bad_json_line", "{tmp}/prompts.jsonl:2: bad JSON"),
        ("unknown_layout", "config key 'layout' = 'vicuna' is not one of jsonl, alpaca_eval"),
        ("misspelt_key", "unknown key 'temprature' (did you mean 'temperature'?)"),
    ],
)
def test_user_errors_are_one_line(
    case: str, message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "apple"}\n{"prompt": "fox"\n')
    args = [f"model={tiny_model_dir}", f"prompts={prompts}", f"out={tmp_path / 'out.jsonl'}"]
    extra = {
        "missing_prompts": [f"prompts={tmp_path / 'nope.jsonl'}"],
        "bad_json_line": [],
        "unknown_layout": ["layout=vicuna"],
        "misspelt_key": ["temprature=0.7"],
    }[case]
    result = ropo_generate([*args, *extra], tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("ropo: error: ")
    assert message.format(tmp=tmp_path) in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_weights_are_packed_once_for_all_batches(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    model = packable_model(tokenizer.vocab_size)
    packings = count_packings(monkeypatch)
    records = [
        PromptRecord(i, ({"role": "user", "content": text},), (), f"test:{i}")
        for i, text in enumerate(["tango", "apple fox", "fox", "apple apple", "zebra"])
    ]
    cfg = settings(model="-", prompts="-", out="-", batch_size=2, temperature=0)  # 3 batches
    conversations = answer(model, tokenizer, PLAIN, records, cfg, GenerationStats())
    assert packings[0] == 2 * model.config.n_layers and not any(packings[1:])  # once, then reused
    assert len(packings) == 1 + 3  # answer's block, then one per generate call
    assert not any(k.startswith("packed_") for m in model.modules() for k in m.__dict__)
    # the same tokens as generate calls that each pack for themselves
    for c in conversations:
        alone = generate(model, [prompt_ids(tokenizer, c.prompt)], MAX_NEW, temperature=0,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)  # fmt: skip
        assert list(c.responses[0].token_ids) == alone[0]
