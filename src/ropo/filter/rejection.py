"""Robustness-guided rejection sampling: new pairs for the prompts whose pairs were dropped.

After a round's w-step, every prompt of a dropped pair gets K responses sampled from the current
policy. Each response is scored by its implicit reward r(y) = beta * log(pi_theta(y|x) /
pi_ref(y|x)) (summed log-probs), and the pair (highest reward, lowest reward) - the candidate pair
the model is most confident about, hence the one with the lowest ROPO loss - joins the next
round's training set. The paper names this step and its purpose ("to compensate for the potential
important information in discarded queries", abstract); the pair rule, K and the sampling
settings are our reconstruction (docs/method.md §4).

`pair_rule` picks another way to build the pair (the key rs_pair_rule): "likelihood" ranks the
candidates by the policy's mean log-prob per token instead, and "+original" adds the dropped
pair's two responses to the K samples. On the built-in task the implicit reward of on-policy
samples favours rare wrong answers: a sample the policy drew despite a tiny reference
probability tends to be one it raised far above the reference, while the right answer, which the
reference already gives most of its mass, can gain at most -log pi_ref(y) (docs/method.md §4).
The policy's own likelihood has no pi_ref to divide by, so it does not favour rare samples; with
"+original" it mostly puts the dropped pair back, in the order the policy prefers.

The sampling stage, after the filter: resample.py runs it between rounds, and its SampledPair
records travel through the next round, its checkpoints (to_record) and the audit file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ropo.data import TokenizedPair
from ropo.logps import PairLogps, collate_sequences
from ropo.logps_fused import sequence_logps
from ropo.loss import implicit_reward
from ropo.models.kernels import packed_for_decoding
from ropo.models.llama import Transformer
from ropo.models.responses import sample_responses
from ropo.models.tokenizer import Tokenizer
from ropo.progress import progress_bar

PAIR_SCORES = ("reward", "likelihood")  # how candidates are ranked; "+original" may follow


@dataclass(frozen=True)
class SamplingSettings:
    """How rejection sampling draws and picks: K samples per prompt (`rs_k`) at `temperature`
    and `top_p`, at most `max_new_tokens` each, paired by `pair_rule`; beta scales the implicit
    reward. The samples after round r come from a generator seeded with (seed, r), so a resumed
    run draws the same ones."""

    k: int
    beta: float
    temperature: float
    top_p: float
    max_new_tokens: int
    pair_rule: str = "reward"
    seed: int = 0
    prompts_per_batch: int = 8


@dataclass(frozen=True)
class SampledPair:
    """A new pair from rejection sampling, trained on in the next round: its token ids (id
    "<dropped pair's id>@rs<round index>"), the round after which it was sampled (from 1, as in
    the audit files) and the summed reference log-probs of its responses, computed when they were
    picked, so that the reference model need not be loaded again to train on it."""

    tokens: TokenizedPair
    round: int
    ref_chosen_logp: float
    ref_rejected_logp: float

    def to_record(self) -> dict[str, Any]:
        """JSON-ready values: a line of sampled_pairs.jsonl (without the text) and the form a
        checkpoint's state.json keeps it in."""
        pair = self.tokens
        return {
            "id": pair.id,
            "round": self.round,
            "prompt_ids": list(pair.prompt_ids),
            "chosen_ids": list(pair.chosen_ids),
            "rejected_ids": list(pair.rejected_ids),
            "ref_chosen_logp": self.ref_chosen_logp,
            "ref_rejected_logp": self.ref_rejected_logp,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SampledPair:
        """The pair `to_record` wrote; other fields (the decoded text) are for people only."""
        tokens = TokenizedPair(
            record["id"],
            tuple(record["prompt_ids"]),
            tuple(record["chosen_ids"]),
            tuple(record["rejected_ids"]),
        )
        chosen, rejected = float(record["ref_chosen_logp"]), float(record["ref_rejected_logp"])
        return cls(tokens, record["round"], chosen, rejected)


@dataclass
class SampledPairs:
    """What rejection_sample found: the new pairs, the policy's summed log-probs of their
    responses (B,) each, and the prompts that gave no pair, counted by reason."""

    pairs: list[SampledPair]
    policy: PairLogps
    skipped: dict[str, int] = field(default_factory=dict)


def rejection_sample(
    policy: Transformer,
    reference: Transformer,
    dropped: Sequence[TokenizedPair],
    round_idx: int,
    settings: SamplingSettings,
    tokenizer: Tokenizer,
) -> SampledPairs:
    """One new pair per distinct prompt of `dropped` (the pairs round `round_idx` dropped), built
    by `settings.pair_rule` (module docstring; "reward" is the rule above).

    Prompts whose candidates are all identical give no pair and are counted in `skipped`.
    """
    score_name, with_original = parse_pair_rule(settings.pair_rule)
    device = policy.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(settings.seed * 7919 + round_idx)
    unique = list({pair.prompt_ids: pair for pair in dropped}.values())
    pairs, picked_policy, skipped = [], [], {"identical_samples": 0}
    batches = range(0, len(unique), settings.prompts_per_batch)
    # Packed once for the round, not once per batch (kernels.PackedLinear); the policy's
    # scoring below runs on the packed weights too.
    with packed_for_decoding(policy, rows=settings.prompts_per_batch * settings.k):
        for start in progress_bar(batches, desc="rejection sampling", unit="batch", leave=False):
            group = unique[start : start + settings.prompts_per_batch]
            samples = draw_samples(policy, group, settings, tokenizer, generator)
            # G lists of C
            candidates = candidate_responses(group, samples, settings.k, with_original)
            policy_logps, ref_logps, n_tokens = score_candidates(
                policy, reference, group, candidates, tokenizer.pad_id
            )
            scores = candidate_scores(score_name, policy_logps, ref_logps, n_tokens, settings.beta)
            n_candidates = len(candidates[0])
            scores = scores.view(len(group), n_candidates)  # (G, C)
            for g, source in enumerate(group):
                best, worst = scores[g].argmax().item(), scores[g].argmin().item()
                chosen, rejected = candidates[g][best], candidates[g][worst]
                if chosen == rejected:
                    skipped["identical_samples"] += 1
                    continue
                rows = torch.tensor([g * n_candidates + best, g * n_candidates + worst])
                ref_chosen, ref_rejected = ref_logps[rows].float().cpu().tolist()
                pair_id = f"{source.id}@rs{round_idx}"
                tokens = TokenizedPair(pair_id, source.prompt_ids, tuple(chosen), tuple(rejected))
                pairs.append(SampledPair(tokens, round_idx + 1, ref_chosen, ref_rejected))
                picked_policy.append(policy_logps[rows].float().cpu())
    return SampledPairs(pairs, _as_pair_logps(picked_policy, pairs), skipped)


def draw_samples(
    policy: Transformer,
    group: Sequence[TokenizedPair],
    settings: SamplingSettings,
    tokenizer: Tokenizer,
    generator: torch.Generator,
) -> list[list[int]]:
    """K sampled responses for each prompt of `group`, prompt-major (rows g*K .. g*K+K-1 are
    prompt g's); an empty sample becomes a lone EOS, a response that just stops."""
    prompts = [list(pair.prompt_ids) for pair in group for _ in range(settings.k)]
    samples = sample_responses(
        policy,
        prompts,
        tokenizer,
        settings.max_new_tokens,
        settings.temperature,
        settings.top_p,
        generator,
    )
    return [s if s else [tokenizer.eos_id] for s in samples]


def parse_pair_rule(pair_rule: str) -> tuple[str, bool]:
    """("reward" or "likelihood", whether the dropped pair's responses are candidates too)."""
    score_name, plus, extra = pair_rule.partition("+")
    if score_name not in PAIR_SCORES or (plus and extra != "original"):
        rules = [f"{name}{suffix}" for name in PAIR_SCORES for suffix in ("", "+original")]
        raise ValueError(f"rs_pair_rule = {pair_rule!r} is not one of {', '.join(rules)}")
    return score_name, bool(plus)


def candidate_responses(
    group: Sequence[TokenizedPair], samples: list[list[int]], k: int, with_original: bool
) -> list[list[list[int]]]:
    """Response ids of each prompt's candidates: its K samples (rows g*K .. g*K+K-1 of
    `samples`), then, `with_original`, the dropped pair's chosen and rejected response."""
    candidates = []
    for g, pair in enumerate(group):
        own = samples[g * k : (g + 1) * k]
        if with_original:
            own = [*own, list(pair.chosen_ids), list(pair.rejected_ids)]
        candidates.append(own)
    return candidates


def score_candidates(
    policy: Transformer,
    reference: Transformer,
    group: Sequence[TokenizedPair],
    candidates: list[list[list[int]]],
    pad_id: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed policy and reference log-probs of every candidate response and its token count,
    each (G * C,), prompt-major (row g * C + c is candidate c of prompt g)."""
    pairs_by_row = [pair for pair, own in zip(group, candidates, strict=True) for _ in own]
    prompts = [list(pair.prompt_ids) for pair in pairs_by_row]
    responses = [response for own in candidates for response in own]
    batch = collate_sequences(prompts, responses, pad_id)
    batch = [t.to(policy.output.weight.device) for t in batch]
    with torch.inference_mode():
        policy_logps, n_tokens = sequence_logps(policy.eval(), *batch)
        ref_logps, _ = sequence_logps(reference.eval(), *batch)
    return policy_logps, ref_logps, n_tokens


def candidate_scores(
    score_name: str, policy_logps: Tensor, ref_logps: Tensor, n_tokens: Tensor, beta: float
) -> Tensor:
    """The score each candidate is ranked by, (R,) from summed log-probs and token counts (R,).

    reward: the implicit reward beta * (log pi_theta - log pi_ref), summed (DPO paper eq. 5).
    likelihood: log pi_theta per response token; the mean, so that length alone does not
    decide (the sum favours short answers, which on the built-in task drop numbers).
    """
    if score_name == "likelihood":
        return policy_logps / n_tokens.clamp(min=1.0)
    return implicit_reward(policy_logps, ref_logps, beta)


def _as_pair_logps(picked: list[torch.Tensor], pairs: list[SampledPair]) -> PairLogps:
    stacked = torch.stack(picked) if picked else torch.zeros(0, 2)  # (B, 2): chosen, rejected
    chosen_tokens = torch.tensor([float(len(p.tokens.chosen_ids)) for p in pairs])
    rejected_tokens = torch.tensor([float(len(p.tokens.rejected_ids)) for p in pairs])
    return PairLogps(stacked[:, 0], stacked[:, 1], chosen_tokens, rejected_tokens)
