"""`ropo eval`: how a trained policy ranks a file of preference pairs against its reference.

Beside the training flow, after it: the pairs are loaded and tokenised as `ropo train` does
(data.py), the policy and then the reference score them with training's log-prob code
(logps_fused.score_pairs, summed response log-probs), and evaluate.py turns the two into
preference accuracy with its 95% interval, margins, implicit rewards and the DPO loss. The
results are printed, and written as JSON to out= (or standard output), with per_pair=true also
by pair id.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ropo.data import DataReport, TokenizedPair, load_pairs, tokenize_pairs
from ropo.eval_config import EvalSettings
from ropo.evaluate import HeldoutMetrics, heldout_metrics, per_pair_records
from ropo.logps import PairLogps
from ropo.logps_fused import score_pairs
from ropo.models import Tokenizer, load_model, load_tokenizer
from ropo.models.chat_format import load_chat_format
from ropo.models.config import read_model_config
from ropo.models.files import write_atomic
from ropo.presets import resolve_inputs, resolve_model
from ropo.resources import check_vocab, pick_device


def run_eval(settings: EvalSettings) -> dict[str, Any]:
    """Score every pair of `settings.data` with the policy and the reference; print the results
    and write them (JSON) to out= or standard output. Returns the JSON's dict."""
    out = Path(settings.out) if settings.out else None
    if out is not None:
        _check_out(out)
    # Every missing input (weights and data) in one error, not one per attempt.
    model_dir, data_file, data_format = resolve_inputs(
        settings.model, settings.data, settings.format
    )
    reference_dir = resolve_model(settings.reference)
    tokenizer = load_tokenizer(model_dir)
    check_same_tokenizer(tokenizer, model_dir, reference_dir)
    chat = load_chat_format(model_dir, settings.template, tokenizer)
    pairs, report = load_pairs(data_file, data_format, chat)
    tokens, report = tokenize_pairs(pairs, tokenizer, settings.max_length, report, chat)
    if not tokens:
        raise ValueError(f"{data_file}: no usable pairs ({report.summary()})")
    policy = score_with(model_dir, tokens, tokenizer.pad_id, settings, "policy log-probs")
    reference = score_with(reference_dir, tokens, tokenizer.pad_id, settings, "reference log-probs")
    metrics = heldout_metrics(policy, reference, settings.beta)
    ids = [pair.id for pair in tokens]
    per_pair_file = out.with_suffix(".pairs.jsonl") if settings.per_pair and out else None
    result = results(settings, model_dir, reference_dir, data_file, report, metrics)
    result["per_pair_file"] = str(per_pair_file) if per_pair_file else None
    if per_pair_file is not None:
        records = per_pair_records(ids, policy, reference, settings.beta)
        write_atomic(per_pair_file, "".join(json.dumps(r) + "\n" for r in records))
    text = json.dumps(result, indent=1) + "\n"
    if out is not None:
        write_atomic(out, text)  # never a cut-short results file that looks complete
    for_people = sys.stdout if out is not None else sys.stderr  # stdout: the JSON alone
    if chat.note:
        print(chat.note, file=for_people)
    print(describe(result), file=for_people)
    if out is None:  # the JSON alone on standard output, so that it can be piped
        sys.stdout.write(text)
    return result


def check_same_tokenizer(tokenizer: Tokenizer, model_dir: Path, reference_dir: Path) -> None:
    """ValueError unless both models can read the policy's token ids: log-probs of two
    tokenisations of the same text are not comparable."""
    for directory in (model_dir, reference_dir):
        check_vocab(tokenizer, read_model_config(directory), directory)
    ours, theirs = tokenizer.model_file, reference_dir / tokenizer.model_file.name
    if theirs.is_file() and theirs.read_bytes() != ours.read_bytes():
        raise ValueError(
            f"{theirs}: the reference's tokenizer differs from the policy's ({ours}); a policy "
            "is compared with the model it was trained from, which shares its tokenizer"
        )


def score_with(
    model_dir: Path, tokens: list[TokenizedPair], pad_id: int, settings: EvalSettings, desc: str
) -> PairLogps:
    """Summed response log-probs of every pair under the model in `model_dir`, (N,) each; the
    model is freed afterwards, so that policy and reference never share the memory."""
    device = pick_device(settings.device)
    model = load_model(model_dir, dtype=getattr(torch, settings.dtype), device=device)
    logps = score_pairs(model, tokens, settings.batch_size, pad_id, desc=desc)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return logps


def results(
    settings: EvalSettings,
    model_dir: Path,
    reference_dir: Path,
    data_file: Path,
    report: DataReport,
    metrics: HeldoutMetrics,
) -> dict[str, Any]:
    """The JSON that `ropo eval` writes: what was compared, how many pairs, the metrics."""
    return {
        "model": str(model_dir),
        "reference": str(reference_dir),
        "data": str(data_file),
        "settings": {key: getattr(settings, key) for key in settings.__dataclass_fields__},
        "n_read": report.read,
        "n_pairs": metrics.n_pairs,
        "n_skipped": sum(report.skipped.values()),
        "skipped": dict(report.skipped),
        "accuracy": metrics.accuracy,
        "accuracy_ci95": list(metrics.accuracy_ci95),
        "accuracy_ci_method": "wilson",
        "margin_mean": metrics.margin_mean,
        "reward_margin_mean": metrics.reward_margin_mean,
        "chosen_reward_mean": metrics.chosen_reward_mean,
        "rejected_reward_mean": metrics.rejected_reward_mean,
        "loss_mean": metrics.loss_mean,
    }


def describe(result: dict[str, Any]) -> str:
    """The results for a person, a few lines."""
    skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(result["skipped"].items()))
    low, high = result["accuracy_ci95"]
    correct = round(result["accuracy"] * result["n_pairs"])
    beta = result["settings"]["beta"]
    lines = [
        f"policy {result['model']} against reference {result['reference']}, beta {beta}",
        f"{result['data']}: read {result['n_read']} pairs, scored {result['n_pairs']}, "
        f"skipped {result['n_skipped']}" + (f" ({skipped})" if skipped else ""),
        f"preference accuracy {result['accuracy']:.4f} ({correct} of {result['n_pairs']} "
        f"pairs with margin > 0; 95% Wilson interval {low:.4f} to {high:.4f})",
        f"mean margin {result['margin_mean']:.4f} nats, reward margin "
        f"{result['reward_margin_mean']:.4f} (chosen {result['chosen_reward_mean']:.4f}, "
        f"rejected {result['rejected_reward_mean']:.4f}), DPO loss {result['loss_mean']:.4f}",
    ]
    written = [f for f in (result["settings"]["out"], result["per_pair_file"]) if f]
    if written:
        lines.append(f"wrote {', '.join(written)}")
    return "\n".join(lines)


def _check_out(out: Path) -> None:
    """Fail before any model loads if out= cannot be written."""
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; out= expects a file to write the results to")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory, so out={out} cannot be written")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{out.parent}: not writable, so out={out} cannot be written")
