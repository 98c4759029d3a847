"""The sampling stage of a round: new pairs for the prompts of dropped pairs, and their
reference log-probs. Wraps filter/rejection.py for train.py (reference model, seed, records,
<out>/sampled_pairs.jsonl); sits after run_setup.py, whose Run it reads, and before train.py.
"""

from __future__ import annotations

from typing import Any

import torch

from ropo import audit
from ropo.data import TokenizedPair
from ropo.filter.rejection import rejection_sample
from ropo.filter.weights import DropDecision
from ropo.logps import PairLogps
from ropo.models import load_model
from ropo.models.llama import Transformer
from ropo.ref_cache import RefLogps
from ropo.run_setup import Run


def sample_replacements(
    run: Run, policy: Transformer, decision: DropDecision, round_idx: int
) -> list[dict[str, Any]]:
    """Rejection-sampled pairs for the prompts of dropped pairs, as JSON-ready records.

    The reference model is loaded only for this and freed again: it scores the new responses.
    """
    cfg, tokenizer, device = run.cfg, run.tokenizer, run.step.device
    dropped = set(decision.dropped_ids)
    reference = load_model(run.reference_dir, dtype=run.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed * 7919 + round_idx)
    result = rejection_sample(
        policy,
        reference,
        [p for p in run.data.tokens if p.id in dropped],
        round_idx,
        cfg.filter.rs_k,
        cfg.loss.beta,
        cfg.filter.rs_temperature,
        cfg.filter.rs_top_p,
        cfg.filter.rs_max_new_tokens,
        tokenizer.eos_id,
        tokenizer.pad_id,
        generator,
        vocab_limit=tokenizer.vocab_size,
        pair_rule=cfg.filter.rs_pair_rule,
    )
    del reference
    policy.train()
    records = []
    for i, pair in enumerate(result.pairs):
        records.append(
            {
                "id": pair.id,
                "round": round_idx + 1,  # the round after which it was sampled, from 1
                "prompt_ids": list(pair.prompt_ids),
                "chosen_ids": list(pair.chosen_ids),
                "rejected_ids": list(pair.rejected_ids),
                "ref_chosen_logp": result.reference.chosen[i].item(),
                "ref_rejected_logp": result.reference.rejected[i].item(),
                "chosen": tokenizer.decode(list(pair.chosen_ids)),
                "rejected": tokenizer.decode(list(pair.rejected_ids)),
            }
        )
    audit.append_jsonl(run.out / "sampled_pairs.jsonl", records)
    print(
        f"rejection sampling: {len(records)} new pairs for {len(dropped)} dropped pairs "
        f"(skipped: {result.skipped})"
    )
    return records


def sampled_pair(record: dict[str, Any]) -> TokenizedPair:
    """The TokenizedPair of a sampled record, to train on in the next round."""
    return TokenizedPair(
        record["id"],
        tuple(record["prompt_ids"]),
        tuple(record["chosen_ids"]),
        tuple(record["rejected_ids"]),
    )


def sampled_ref_logps(records: list[dict[str, Any]]) -> RefLogps:
    """Reference log-probs of sampled pairs (computed when they were sampled)."""
    column = lambda key: torch.tensor([float(r[key]) for r in records])  # noqa: E731
    count = lambda key: torch.tensor([float(len(r[key])) for r in records])  # noqa: E731
    logps = PairLogps(
        column("ref_chosen_logp"),
        column("ref_rejected_logp"),
        count("chosen_ids"),
        count("rejected_ids"),
    )
    return RefLogps([r["id"] for r in records], logps, "sampled")
