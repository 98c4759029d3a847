"""`<out>/final` is what was trained, for any Hugging Face tool; cleaned.jsonl is the input's own.

Unit tests write the tokenizer files of models/export.py into a folder and load it with
transformers' AutoTokenizer: the ids and the chat template must be ropo's. Three tiny
`python -m ropo train` runs (one round) then check the whole path: a plain-data run with
save_dtype=bfloat16, a LoRA run on UltraFeedback-layout data with the llama2-chat template (its
adapters load with peft), and a run on a bfloat16 checkpoint with the default save_dtype.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import WORDS, read_jsonl, synthetic_records
from model_fixtures import max_diff
from ropo.audit import export_cleaned
from ropo.config_load import load_config
from ropo.data import load_pairs
from ropo.models import generate, load_model, load_tokenizer, save_model
from ropo.models.chat_format import ChatFormat, load_chat_format
from ropo.models.chat_templates import TEMPLATES, format_chat
from ropo.models.export import SPM_FILES, TokenizerExport, write_tokenizer_files
from ropo.models.load import checkpoint_dtype
from ropo.models.peft_export import peft_name
from test_faults import ropo_train

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model through protobuf

RUN = ("loss=ropo", "rounds=1", "rho=0.25", "noise=0.25", "batch_size=4", "lr=3e-3",
       "warmup_ratio=0", "max_length=96", "device=cpu")  # fmt: skip
# (prompt, response): spaces at either end and inside, unicode, newlines, turn markers.
TEXTS = [
    ("Question: apple banana cherry Answer:", " apple apple"),
    ("Question: golf", "hotel"),
    ("Question: kilo  ", "  lima mike  "),
    ("Question: café 東京 😀 naïve", " résumé Straße ✓"),
    ("line one\nline two\n", "zulu\n\nxray"),
    ("tab\there", "\tyankee"),
    ("[INST] apple [/INST] banana </s><s>[INST] cherry [/INST]", " delta"),
    ("[INST] echo [/INST] fox</s>[INST] golf [/INST]", "hotel"),
]
CONVERSATIONS = [
    [{"role": "user", "content": "Question: apple"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": " Question: apple banana "},
        {"role": "assistant", "content": " apple "},
        {"role": "user", "content": "And café 東京?\n"},
    ],
    [
        {"role": "user", "content": "kilo lima"},
        {"role": "assistant", "content": "mike"},
        {"role": "user", "content": "november"},
    ],
]


def hf_tokenizer(path: Path) -> transformers.PreTrainedTokenizerBase:
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoTokenizer.from_pretrained(str(path))


def joined(prompt: str, response: str) -> str:
    """prompt + response as one text, joined as tokenizer.py's boundary rule joins them."""
    body = prompt.rstrip(" ")
    response = prompt[len(body) :] + response
    needs_space = not (body[-1:].isspace() or response[:1].isspace())
    return body + " " * needs_space + response


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tokenizer files of the tiny model, written for each chat template."""
    tokenizer = load_tokenizer(tiny_model_dir)
    folders = {}
    for template in TEMPLATES:
        folders[template] = tmp_path_factory.mktemp(f"export-{template}")
        export = TokenizerExport(tokenizer, ChatFormat(template))
        write_tokenizer_files(folders[template], export, 256)
    return folders


def test_autotokenizer_gives_ropo_ids(exported: dict[str, Path], tiny_model_dir: Path) -> None:
    ours, hf = load_tokenizer(tiny_model_dir), hf_tokenizer(exported["plain"])
    for prompt, response in TEXTS:
        prompt_ids, response_ids = ours.encode_prompt_response(prompt, response)
        # add_eos_token is false (a prompt to generate from has none): EOS follows the response
        hf_ids = hf(joined(prompt, response)).input_ids + [hf.eos_token_id]
        assert hf_ids == prompt_ids + response_ids, (prompt, response)
        assert hf(prompt.rstrip(" ")).input_ids == prompt_ids  # the BOS of training included
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, 2)
    assert hf.model_max_length == 256


def test_prompt_with_a_leading_space(exported: dict[str, Path], tiny_model_dir: Path) -> None:
    """The one difference the README states: transformers 5's LlamaTokenizer puts no dummy
    prefix before a text that starts with a space; sentencepiece (ropo) and transformers 4 do."""
    ours, hf = load_tokenizer(tiny_model_dir), hf_tokenizer(exported["plain"])
    prompt_ids, response_ids = ours.encode_prompt_response(" lead space", "x")
    expected = prompt_ids + response_ids
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert ours.sp.id_to_piece(expected[1]) == ours.sp.id_to_piece(expected[2]) == "▁"
        expected = expected[:1] + expected[2:]  # one "▁" fewer
    assert hf(" lead space x").input_ids + [hf.eos_token_id] == expected


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_renders_the_prompts_ropo_trained_on(
    template: str, exported: dict[str, Path], tiny_model_dir: Path
) -> None:
    ours, hf = load_tokenizer(tiny_model_dir), hf_tokenizer(exported[template])
    chat = ChatFormat(template)
    for messages in CONVERSATIONS:
        prompt = format_chat(messages, template)
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == "<s>" + prompt  # apply_chat_template adds no BOS id itself
        prompt_ids, _ = ours.encode_prompt_response(prompt, "x")
        assert hf(text, add_special_tokens=False).input_ids == prompt_ids
        for response in (" apple", "apple", "\napple "):  # a final answer: the training text
            answered = messages + [{"role": "assistant", "content": response}]
            text = hf.apply_chat_template(answered, tokenize=False)
            ids = sum(chat.encode(ours, prompt, chat.response(messages, response)), [])
            assert hf(text, add_special_tokens=False).input_ids == ids, (messages, response)
    assert load_chat_format(exported[template], "auto", ours) == chat  # a final/ reads back


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}],
    ],
)
def test_chat_template_refuses_what_ropo_refuses(
    messages: list[dict], exported: dict[str, Path]
) -> None:
    with pytest.raises(ValueError):
        format_chat(messages, "llama2-chat")
    with pytest.raises(Exception, match="user"):  # jinja2's TemplateError via raise_exception
        hf_tokenizer(exported["llama2-chat"]).apply_chat_template(messages, tokenize=False)


def test_peft_names_follow_hugging_face_module_names() -> None:
    expected = {
        "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
    }  # fmt: skip
    for ours, hf in expected.items():
        for matrix, peft_matrix in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            name = peft_name(f"layers.3.{ours}.{matrix}")
            assert name == f"base_model.model.model.layers.3.{hf}.{peft_matrix}.weight"


def test_save_dtype_is_checked() -> None:
    assert load_config(None, []).model.save_dtype == ""
    with pytest.raises(ValueError, match="save_dtype"):
        load_config(None, ["save_dtype=fp8"])


# --- end-to-end runs ----------------------------------------------------------------------


def write_plain_pairs(path: Path, n: int) -> Path:
    """Plain records with fields ropo does not read, which cleaned.jsonl must keep."""
    with open(path, "w", encoding="utf-8") as handle:
        for i, record in enumerate(synthetic_records(n, seed=1)):
            record |= {"annotator": "größe ✓", "meta": {"row": i, "tags": ["a", "b"]}}
            handle.write(json.dumps(record, ensure_ascii=i % 2 == 0) + "\n")
    return path


def write_ultrafeedback_pairs(path: Path, n: int) -> Path:
    """HuggingFaceH4/ultrafeedback_binarized rows: message lists, some with a system turn or an
    earlier exchange."""
    rng = random.Random(2)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(3)]
            other = rng.choice([w for w in WORDS if w != words[0]])
            turns = [{"role": "user", "content": "Question: " + " ".join(words)}]
            if i % 3 == 1:
                turns = [{"role": "system", "content": "Be brief."}, *turns]
            if i % 3 == 2:
                earlier = [
                    {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "hi"},
                ]
                turns = earlier + turns
            chosen = [*turns, {"role": "assistant", "content": f"{words[0]} {words[0]}"}]
            rejected = [*turns, {"role": "assistant", "content": f"{other} {other}"}]
            record = {"prompt": turns[-1]["content"], "prompt_id": f"u{i:03d}",
                      "chosen": chosen, "rejected": rejected, "messages": chosen,
                      "score_chosen": 8.0, "score_rejected": float(i % 5)}  # fmt: skip
            handle.write(json.dumps(record) + "\n")
    return path


def train_run(tmp: Path, model: Path, data: Path, *extra: str) -> Path:
    out = tmp / "run"
    result = ropo_train([f"model={model}", f"data={data}", f"out={out}", *RUN, *extra], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export_plain")
    data = write_plain_pairs(tmp / "pairs.jsonl", 24)
    return train_run(tmp, tiny_model_dir, data, "save_dtype=bfloat16")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export_lora")
    data = write_ultrafeedback_pairs(tmp / "uf.jsonl", 24)
    lora = ("format=ultrafeedback", "template=llama2-chat", "lora_rank=4", "lora_alpha=8",
            "lr=3e-2")  # fmt: skip
    return train_run(tmp, tiny_model_dir, data, *lora)


def safetensors_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def test_final_loads_in_transformers_and_decodes_greedily_as_ropo(lora_run: Path) -> None:
    final = lora_run / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager")
    tokenizer = hf_tokenizer(final)
    assert not hf.generation_config.do_sample  # False, or None (unset) in transformers 5
    assert hf.generation_config.eos_token_id == tokenizer.eos_token_id
    messages = [{"role": "user", "content": "Question: apple banana cherry"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s>" + format_chat(messages, "llama2-chat")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    ours = generate(load_model(final), ids.tolist(), 6, temperature=0, eos_id=2)
    assert out == ours[0]


def test_final_and_checkpoints_carry_the_tokenizer_files(plain_run: Path) -> None:
    final, checkpoint = plain_run / "final", plain_run / "checkpoints" / "round-1"
    for name in SPM_FILES:
        assert (final / name).read_bytes() == (checkpoint / name).read_bytes(), name
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert set(SPM_FILES) <= set(manifest["files"])  # checked on resume like the weights
    config = json.loads((final / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"], config["legacy"]) == (1, 0, 1)
    assert config["model_max_length"] == 256  # max_position_embeddings, not the run's max_length
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    ours, hf = load_tokenizer(final), hf_tokenizer(final)
    for prompt, response in TEXTS:
        ids = sum(ours.encode_prompt_response(prompt, response), [])
        assert hf(joined(prompt, response)).input_ids + [2] == ids
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(final)
    prompt = hf("Question: apple", return_tensors="pt").input_ids
    assert hf_model.generate(prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt.shape[1]


def test_save_dtype_sets_final_and_checkpoints_keep_full_precision(
    plain_run: Path, lora_run: Path
) -> None:
    assert safetensors_dtypes(plain_run / "final" / "model.safetensors") == {"BF16"}
    config = json.loads((plain_run / "final" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    checkpoint = plain_run / "checkpoints" / "round-1" / "model.safetensors"
    assert safetensors_dtypes(checkpoint) == {"F32"}  # an exact resume needs the fp32 weights
    assert safetensors_dtypes(lora_run / "final" / "model.safetensors") == {"F32"}  # the input's


def test_default_save_dtype_follows_the_input_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bf16_model = tmp_path / "bf16_model"
    save_model(load_model(tiny_model_dir, dtype=torch.bfloat16), bf16_model)
    shutil.copy(tiny_model_dir / "tokenizer.model", bf16_model / "tokenizer.model")
    assert checkpoint_dtype(bf16_model) == torch.bfloat16
    assert checkpoint_dtype(tiny_model_dir) == torch.float32
    data = write_plain_pairs(tmp_path / "pairs.jsonl", 8)
    out = train_run(tmp_path, bf16_model, data, "rho=0", "noise=0", "dtype=float32")
    assert safetensors_dtypes(out / "final" / "model.safetensors") == {"BF16"}
    checkpoint = out / "checkpoints" / "round-1" / "model.safetensors"
    assert safetensors_dtypes(checkpoint) == {"F32"}  # the training dtype


def test_peft_loads_the_adapters_as_trained(lora_run: Path, tiny_model_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    adapter = lora_run / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8.0, False)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="eager"
    )
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = peft.PeftModel.from_pretrained(base, adapter).eval()
        peft_logits = adapted(input_ids=ids).logits
        merged = load_model(lora_run / "final")(ids)
    assert max_diff(peft_logits, base_logits) > 1e-3  # the adapters did train
    assert max_diff(peft_logits, merged) < 1e-4


def check_cleaned(run: Path, data: Path, id_key: str) -> list[dict]:
    """cleaned.jsonl holds exactly the kept pairs, each its input record plus ropo_id and
    ropo_flipped, in file order; returns its records."""
    originals = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    cleaned = read_jsonl(run / "cleaned.jsonl")
    kept = {r["id"] for r in read_jsonl(run / "pairs.jsonl") if r["kept"]}
    flips = json.loads((run / "flips.json").read_text())
    assert [r["ropo_id"] for r in cleaned] == [o[id_key] for o in originals if o[id_key] in kept]
    by_id = {o[id_key]: o for o in originals}
    for record in cleaned:
        pair_id = record.pop("ropo_id")
        assert record.pop("ropo_flipped") == flips[pair_id]
        assert record == by_id[pair_id]  # every field, the input's labels even when flipped
    return cleaned


def test_cleaned_without_noise_and_after_the_data_changed(tmp_path: Path) -> None:
    data = write_plain_pairs(tmp_path / "pairs.jsonl", 6)
    pairs, _ = load_pairs(data)
    export_cleaned(tmp_path / "cleaned.jsonl", pairs, ["p1", "p4"])
    lines = data.read_text(encoding="utf-8").splitlines()
    expected = [json.loads(lines[i]) | {"ropo_id": f"p{i}"} for i in (1, 4)]
    assert read_jsonl(tmp_path / "cleaned.jsonl") == expected  # no ropo_flipped without noise
    data.write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{data}:5: this pair's line is no longer"):
        export_cleaned(tmp_path / "cleaned.jsonl", pairs, ["p1", "p4"])
    assert read_jsonl(tmp_path / "cleaned.jsonl") == expected  # the last good file stays
    assert not (tmp_path / ".cleaned.jsonl.tmp").exists()


def test_cleaned_plain_pairs_are_the_input_records(plain_run: Path) -> None:
    data = plain_run.parent / "pairs.jsonl"
    cleaned = check_cleaned(plain_run, data, "id")
    assert len(cleaned) == 18  # 24 pairs, rho = 0.25
    flips = json.loads((plain_run / "flips.json").read_text())
    assert any(flips[r["id"]] for r in cleaned)  # a flipped pair is kept, as in the input
    assert "größe ✓" in (plain_run / "cleaned.jsonl").read_text(encoding="utf-8")


def test_cleaned_ultrafeedback_pairs_are_the_input_records(lora_run: Path) -> None:
    cleaned = check_cleaned(lora_run, lora_run.parent / "uf.jsonl", "prompt_id")
    assert len(cleaned) == 18
    assert {"messages", "score_chosen", "chosen"} <= set(cleaned[0])
