"""`ropo generate`: a model's responses to a file of prompts, in the files judges read.

Beside the training flow, after it: prompts (generate_prompts.py) are rendered with the chat
format and tokenised exactly as training tokenises the prompt of a pair, answered in
length-sorted batches by the KV-cached sampler (models/sample.py), and written as our JSONL,
AlpacaEval's model outputs or MT-Bench's answers (generate_layouts.py). MT-Bench questions are
answered turn by turn: turn k's prompt is the conversation so far, the model's own answers included.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ropo.data import render_prompt
from ropo.generate_config import GenerateSettings
from ropo.generate_layouts import Conversation, Response, write_responses
from ropo.generate_prompts import PromptRecord, read_prompts
from ropo.models import Tokenizer, load_model, load_tokenizer
from ropo.models.chat_format import PLAIN, ChatFormat, load_chat_format
from ropo.models.config import read_model_config
from ropo.models.kernels import packed_for_decoding
from ropo.models.llama import Transformer
from ropo.models.responses import sample_responses
from ropo.presets import resolve_model
from ropo.progress import PlainProgress, progress_bar
from ropo.resources import DTYPES, check_vocab, pick_device


@dataclass
class GenerationStats:
    """What one `ropo generate` did, for its last line."""

    responses: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    finish: Counter = field(default_factory=Counter)  # finish_reason -> responses
    position_limited: int = 0  # responses cut short by max_position_embeddings


def run_generate(cfg: GenerateSettings) -> GenerationStats:
    """Read the prompts, answer them with the model and write `cfg.out` in `cfg.layout`."""
    out, prompts_file = Path(cfg.out), Path(cfg.prompts)
    prompts = read_prompts(prompts_file, multi_turn=cfg.layout == "mt_bench")
    _check_out(out, prompts_file)  # before the model loads, not after the generation
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    check_vocab(tokenizer, read_model_config(model_dir), model_dir)
    chat = load_chat_format(model_dir, cfg.template, tokenizer)
    if chat.note:
        print(chat.note)
    device = pick_device(cfg.device)
    model = load_model(model_dir, DTYPES.get(cfg.dtype), device)
    stats = GenerationStats()
    conversations = answer(model, tokenizer, chat, prompts.records, cfg, stats)
    generator = cfg.generator or model_name(model_dir)
    existed = out.exists()
    write_responses(conversations, cfg.layout, out, generator, cfg.n)
    print(_summary(stats, prompts.blank_lines, out, existed, model.config.max_position_embeddings))
    return stats


def model_name(model_dir: Path) -> str:
    """The directory's name; a run's final/ is named after its run (runs/mine/final -> mine)."""
    model_dir = model_dir.resolve()
    if model_dir.name == "final" and (model_dir.parent / "run.json").is_file():
        return model_dir.parent.name
    return model_dir.name


def _check_out(out: Path, prompts_file: Path) -> None:
    """ValueError if `out` is a directory, the prompts file or in a folder we may not write to;
    creates its folder."""
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; out= expects a file to write the responses to")
    if out.exists() and out.resolve() == prompts_file.resolve():
        raise ValueError(f"{out}: out= is the prompts file; write the responses elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{out.parent}: not writable; choose another out= for the responses")


def answer(
    model: Transformer,
    tokenizer: Tokenizer,
    chat: ChatFormat,
    records: list[PromptRecord],
    cfg: GenerateSettings,
    stats: GenerationStats,
) -> list[Conversation]:
    """cfg.n answered conversations per record, in input order (a record's samples together).

    Turn k of every conversation that has one is answered in one pass over length-sorted batches;
    then each conversation gets its answer and, for MT-Bench, its next user turn.
    """
    conversations = [
        Conversation(record, sample, list(record.messages))
        for record in records
        for sample in range(cfg.n)
    ]
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    total = sum(c.record.n_turns for c in conversations)
    # Packed once for every batch and turn, not once per generate call (kernels.PackedLinear).
    packed = packed_for_decoding(model, rows=cfg.batch_size)
    with progress_bar(total=total, desc="generate", unit="prompt") as progress, packed:
        for turn in range(max(c.record.n_turns for c in conversations)):
            waiting = [c for c in conversations if turn < c.record.n_turns]
            texts = [render_prompt(c.messages, chat, c.record.source) for c in waiting]
            prompts_ids = [prompt_ids(tokenizer, text, chat) for text in texts]
            responses = answer_prompts(
                model, tokenizer, prompts_ids, cfg, generator, stats, progress
            )
            for c, text, response in zip(waiting, texts, responses, strict=True):
                c.prompt = c.prompt or text
                c.responses.append(response)
                if turn + 1 < c.record.n_turns:
                    c.messages.append({"role": "assistant", "content": response.text})
                    c.messages.append({"role": "user", "content": c.record.follow_ups[turn]})
    return conversations


def prompt_ids(tokenizer: Tokenizer, prompt: str, chat: ChatFormat = PLAIN) -> list[int]:
    """The ids training gives the prompt part of a pair whose prompt `chat` rendered (any named
    template encodes as PLAIN: BOS, turn markers as EOS/BOS ids, trailing spaces left to the
    response). They do not depend on the response, as data.tokenize_pairs asserts, so an empty
    one gives them."""
    return chat.encode(tokenizer, prompt, "")[0]


def answer_prompts(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts_ids: list[list[int]],
    cfg: GenerateSettings,
    generator: torch.Generator,
    stats: GenerationStats,
    progress: tqdm | PlainProgress,
) -> list[Response]:
    """One Response per prompt, in the given order, from batches of similar length.

    A row may not run past the model's max_position_embeddings: its budget is what is left
    there (at most max_new_tokens), and a prompt that fills every position gets no answer.
    """
    limit = model.config.max_position_embeddings
    order = sorted(range(len(prompts_ids)), key=lambda i: -len(prompts_ids[i]))  # longest first
    responses: list[Response | None] = [None] * len(prompts_ids)
    start_time = time.perf_counter() - stats.seconds
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        budgets = {i: min(cfg.max_new_tokens, limit - len(prompts_ids[i])) for i in batch}
        runnable = [i for i in batch if budgets[i] >= 1]
        for i in batch:
            if budgets[i] < 1:
                responses[i] = Response((), "", "prompt_too_long")
            stats.position_limited += 0 < budgets[i] < cfg.max_new_tokens
        if runnable:
            prompts = [prompts_ids[i] for i in runnable]
            budget = max(budgets[i] for i in runnable)
            rows = sample_responses(
                model, prompts, tokenizer, budget, cfg.temperature, cfg.top_p, generator
            )
            for i, row in zip(runnable, rows, strict=True):
                responses[i] = _response(row[: budgets[i]], tokenizer)
        for i in batch:
            stats.responses += 1
            stats.new_tokens += len(responses[i].token_ids)
            stats.finish[responses[i].finish_reason] += 1
        stats.seconds = time.perf_counter() - start_time
        progress.set_postfix_str(f"{stats.new_tokens / max(stats.seconds, 1e-9):.1f} tok/s")
        progress.update(len(batch))
    return responses


def _response(token_ids: list[int], tokenizer: Tokenizer) -> Response:
    stopped = bool(token_ids) and token_ids[-1] == tokenizer.eos_id
    return Response(tuple(token_ids), tokenizer.decode(token_ids), "stop" if stopped else "length")


def _summary(
    stats: GenerationStats, blank_lines: int, out: Path, replaced: bool, positions: int
) -> str:
    finish = ", ".join(f"{reason}: {count}" for reason, count in sorted(stats.finish.items()))
    lines = [
        f"generated {stats.responses} responses ({finish}), {stats.new_tokens} new tokens in "
        f"{stats.seconds:.1f} s ({stats.new_tokens / max(stats.seconds, 1e-9):.1f} tokens/s)"
    ]
    if blank_lines:
        plural = "s" if blank_lines > 1 else ""
        lines.append(f"skipped {blank_lines} blank line{plural} of the prompts file")
    if stats.position_limited or stats.finish["prompt_too_long"]:
        lines.append(
            f"{stats.position_limited} responses had fewer than max_new_tokens positions left "
            f"and {stats.finish['prompt_too_long']} prompts none (the model's "
            f"max_position_embeddings = {positions}); their outputs are short or empty"
        )
    lines.append(f"wrote {out}" + (" (replaced the file that was there)" if replaced else ""))
    return "\n".join(lines)
