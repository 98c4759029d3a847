"""TRL's side of the benchmark: a `DPOTrainer` built on our synthetic pairs, driven step by step.

The pairs reach TRL as strings through a word-level tokenizer whose word `t{i}` is token id i, so
TRL's own dataset preparation (prompt extraction, EOS check, tokenisation) yields exactly our
token ids; `trl_examples` checks that. One timed step is what `Trainer._inner_training_loop` does
for one optimizer step without accumulation: collate, `training_step` (forward, loss, backward),
gradient clipping, optimizer step, scheduler step, zero_grad.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from fixtures import BETA, BOS_ID, EOS_ID, LR, MAX_GRAD_NORM, PAD_ID, Workload

from ropo.data import TokenizedPair

Example = dict[str, Any]


def word(token_id: int) -> str:
    return {PAD_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}.get(token_id, f"t{token_id}")


def make_tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer that maps the word `t{i}` to id i and splits on whitespace only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # id 0 = our PAD_ID; the fixed-length pairs never need padding
    )


def as_text(pairs: list[TokenizedPair]) -> list[dict[str, str]]:
    """TRL's standard preference format; the responses already end with the EOS word."""
    text = lambda ids: " ".join(word(i) for i in ids)  # noqa: E731
    return [
        {
            "prompt": text(p.prompt_ids),
            "chosen": " " + text(p.chosen_ids),
            "rejected": " " + text(p.rejected_ids),
        }
        for p in pairs
    ]


def build_trainer(
    model_dir: Path, pairs: list[TokenizedPair], workload: Workload, device: str = "cpu"
) -> Any:
    """DPOTrainer: sigmoid loss, beta 0.1, fp32, constant lr, no warm-up, precomputed reference.

    `precompute_ref_log_probs=True` makes TRL score every pair with the initial policy once, while
    it builds the trainer, and keep no reference model: the same arrangement as our cache.
    Gradient checkpointing (on by default in TRL) is turned off, and so is bf16 on the CPU (TRL's
    default there), because our side runs without them. device="cuda" (gpu_trl.py): fp32 weights
    with bf16 autocast, as our GPU step.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=workload.pairs_per_step,
        precompute_ref_batch_size=2 * workload.pairs_per_step,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        disable_dropout=True,
        bf16=device != "cpu",
        gradient_checkpointing=False,
        use_cpu=device == "cpu",
        max_length=None,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tokenizer = make_tokenizer(model.config.vocab_size)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(as_text(pairs)),
        processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    if device != "cpu":
        # Trainer's loop passes the model through accelerate, which attaches bf16 autocast to
        # its forward; training_step alone would run in fp32. (On the CPU there is no mixed
        # precision to attach, and the CPU benchmark keeps its validated path.)
        trainer.model, trainer.optimizer = trainer.accelerator.prepare(
            trainer.model, trainer.optimizer
        )
    trainer.current_gradient_accumulation_steps = 1  # what _inner_training_loop sets per step
    return trainer


def trl_examples(trainer: Any, pairs: list[TokenizedPair]) -> list[Example]:
    """TRL's prepared rows (token ids + precomputed reference log-probs), checked against ours."""
    rows = trainer.train_dataset
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
    examples = [{key: rows[i][key] for key in keys} for i in range(len(rows))]
    for pair, example in zip(pairs, examples, strict=True):
        theirs = (example["prompt_ids"], example["chosen_ids"], example["rejected_ids"])
        ours = (list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids))
        if theirs != ours:
            raise RuntimeError(f"TRL tokenised pair {pair.id} differently from our token ids")
    return examples


def trl_step(trainer: Any, examples: list[Example]) -> tuple[float, float]:
    """One optimizer step, as Trainer's inner loop does it; returns (loss, pre-clip grad norm)."""
    model = trainer.model
    inputs = trainer.data_collator(examples)
    loss = trainer.training_step(model, inputs)
    grad_norm = trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return loss.item(), float(grad_norm)


def trl_logps(trainer: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen and rejected log-probs (B,) each, from TRL's own log-prob code."""
    inputs = trainer.data_collator(examples)
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
    return chosen.detach(), rejected.detach()
