"""The w-step (keep_count, select_drops) and the flip-detection metrics, on hand-checkable cases."""

import itertools
import math
import random

import pytest
import torch

from ropo.config import FilterSettings
from ropo.filter import (
    DropDecision,
    auroc,
    drop_precision_recall,
    keep_count,
    reward_accuracy,
    select_drops,
)
from ropo.logps import PairLogps
from ropo.loss import get_loss
from ropo.step import pair_losses

# Ten pairs. Sorted by margin: p7 0.05, p1 -0.1, p4 -0.3, p2 -0.5, p9 -0.6, p6 -0.7, p0 -0.9 |
# p5 -1.2, p3 -2.0, p8 -3.0. With ρ = 0.3 we keep (1 − 0.3)·10 = 7 and drop the three lowest.
IDS = [f"p{i}" for i in range(10)]
MARGINS = [-0.9, -0.1, -0.5, -2.0, -0.3, -1.2, -0.7, 0.05, -3.0, -0.6]


def test_worked_example_keeps_the_seven_highest_margins() -> None:
    decision = select_drops(IDS, torch.tensor(MARGINS), rho=0.3)
    assert decision.n_keep == 7
    assert decision.dropped_ids == ("p3", "p5", "p8")  # input order, not margin order
    assert decision.kept_ids == ("p0", "p1", "p2", "p4", "p6", "p7", "p9")
    assert decision.ids == tuple(IDS)
    assert decision.weights.tolist() == [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    assert decision.weights.dtype == torch.float32
    assert decision.weights.sum().item() == 7  # sums to n_keep, not to 1 or N


def test_weights_are_detached_from_a_graph() -> None:
    margins = torch.tensor(MARGINS, requires_grad=True)
    decision = select_drops(IDS, margins * 2, rho=0.3)
    assert not decision.weights.requires_grad
    assert decision.weights.grad_fn is None


@pytest.mark.parametrize(
    ("n_pairs", "rho", "want"),
    [
        (10, 0.3, 7),  # 7.0
        (5, 0.5, 3),  # 2.5 rounds up; Python round(2.5) gives 2
        (10, 0.25, 8),  # 7.5 → 8
        (1, 0.5, 1),  # 0.5 → 1; round(0.5) gives 0
        (45, 0.3, 32),  # 31.5 → 32; in floats (1 − 0.3)·45 = 31.4999…, floor(x + 0.5) gives 31
        (10, 0.0, 10),
        (10, 0.04, 10),  # 9.6 → 10
        (10, 0.06, 9),  # 9.4 → 9
        (0, 0.3, 0),
    ],
)
def test_keep_count_rounds_half_up(n_pairs: int, rho: float, want: int) -> None:
    assert keep_count(n_pairs, rho) == want


def test_ties_are_broken_by_id_whatever_the_input_order() -> None:
    # Four equal margins, keep 2: the tie goes to the smaller ids, "a" and "b".
    ids = ["d", "b", "a", "c"]
    decision = select_drops(ids, torch.tensor([1.0, 1.0, 1.0, 1.0]), rho=0.5)
    assert set(decision.kept_ids) == {"a", "b"}
    assert decision.kept_ids == ("b", "a")  # reported in input order

    # Shuffled inputs with ties across the keep boundary always keep the same ids.
    ids = [f"q{i:02d}" for i in range(12)]
    margins = [-0.5, -0.2, -0.5, -0.9, -0.5, -0.2, -0.5, -0.1, -0.5, -0.9, -0.5, -0.2]
    want = set(select_drops(ids, torch.tensor(margins), rho=0.5).kept_ids)
    rng = random.Random(0)
    for _ in range(20):
        order = list(range(12))
        rng.shuffle(order)
        decision = select_drops(
            [ids[i] for i in order], torch.tensor([margins[i] for i in order]), rho=0.5
        )
        assert set(decision.kept_ids) == want
    # keep 6: q07 (-0.1), q01 q05 q11 (-0.2), then the two smallest ids among the -0.5s: q00, q02
    assert want == {"q07", "q01", "q05", "q11", "q00", "q02"}


def test_rho_zero_keeps_everything() -> None:
    decision = select_drops(IDS, torch.tensor(MARGINS), rho=0.0)
    assert decision.dropped_ids == ()
    assert decision.weights.tolist() == [1.0] * 10


def test_hard_weights_solve_the_linear_program() -> None:
    # min Σ w_i ℓ_i s.t. Σ w_i = 4, 0 ≤ w_i ≤ 1, with ℓ_i any loss decreasing in the margin (here
    # ℓ = −Δ): no 0/1 choice and no fractional w does better.
    losses = torch.tensor([0.7, -0.2, 1.5, 0.3, 0.3, 2.2], dtype=torch.float64)
    ids = [f"r{i}" for i in range(6)]
    decision = select_drops(ids, -losses, rho=1 / 3)
    ours = (decision.weights.double() * losses).sum().item()
    best = min(sum(losses[list(c)].tolist()) for c in itertools.combinations(range(6), 4))
    assert ours == pytest.approx(best)  # −0.2 + 0.3 + 0.3 + 0.7 = 1.1
    assert ours == pytest.approx(1.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        w = torch.rand(6, generator=g, dtype=torch.float64)
        w = w * 4 / w.sum()
        if w.max() <= 1:  # feasible
            assert (w * losses).sum().item() >= ours - 1e-12


def test_non_finite_margins_are_named() -> None:
    margins = torch.tensor([0.1, math.nan, 0.3, math.inf])
    with pytest.raises(ValueError, match=r"2 pair\(s\).*\['b', 'd'\]"):
        select_drops(["a", "b", "c", "d"], margins, rho=0.25)


@pytest.mark.parametrize("rho", [1.0, -0.1, 1.5, math.nan])
def test_bad_rho(rho: float) -> None:
    # ρ is checked once, when the config is read; the w-step asserts it as an invariant.
    with pytest.raises(ValueError, match=rf"config key 'rho' = {rho!r} must be >= 0.0 and < 1.0"):
        FilterSettings(rho=rho)
    with pytest.raises(AssertionError, match=r"rho must be in \[0, 1\)"):
        select_drops(IDS, torch.tensor(MARGINS), rho=rho)
    with pytest.raises(AssertionError, match="rho"):
        keep_count(10, rho)


def test_bad_shapes_and_ids() -> None:
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        select_drops(["a", "b", "c"], torch.tensor([0.1, 0.2]), rho=0.3)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        select_drops(["a", "b"], torch.tensor([[0.1, 0.2]]), rho=0.3)
    with pytest.raises(ValueError, match=r"unique.*\['a'\]"):
        select_drops(["a", "b", "a"], torch.tensor([0.1, 0.2, 0.3]), rho=0.3)
    with pytest.raises(ValueError, match="n_pairs"):
        keep_count(-1, 0.3)


def test_decision_checks_its_own_invariants() -> None:
    with pytest.raises(ValueError, match="sum to 1.0, but n_keep is 2"):
        DropDecision(ids=("a", "b"), weights=torch.tensor([1.0, 0.0]), n_keep=2)
    with pytest.raises(ValueError, match="0/1"):
        DropDecision(ids=("a", "b"), weights=torch.tensor([0.5, 0.5]), n_keep=1)


def test_empty_input() -> None:
    decision = select_drops([], torch.tensor([]), rho=0.3)
    assert isinstance(decision, DropDecision)
    assert decision.n_keep == 0 and decision.kept_ids == () and decision.dropped_ids == ()


# Detection metrics. Five pairs, two of them flipped (a, b).
FLIPPED = {"a": True, "b": True, "c": False, "d": False, "e": False}


@pytest.mark.parametrize(
    ("dropped", "precision", "recall"),
    [
        (["a", "b"], 1.0, 1.0),  # both flips found, nothing clean dropped
        (["a", "c"], 0.5, 0.5),  # 1 of 2 dropped was flipped; 1 of 2 flips dropped
        (["c", "d", "e"], 0.0, 0.0),
        (["a", "b", "c", "d"], 0.5, 1.0),  # 2/4 and 2/2
    ],
)
def test_precision_recall(dropped: list[str], precision: float, recall: float) -> None:
    assert drop_precision_recall(dropped, FLIPPED) == (precision, recall)


def test_precision_recall_undefined_cases_are_nan() -> None:
    precision, recall = drop_precision_recall([], FLIPPED)
    assert math.isnan(precision) and recall == 0.0  # nothing dropped: 0/0 precision, 0/2 recall
    precision, recall = drop_precision_recall(["c"], {"c": False, "d": False})
    assert precision == 0.0 and math.isnan(recall)  # no flips at all: 0/0 recall


def test_precision_recall_rejects_unknown_and_repeated_ids() -> None:
    with pytest.raises(ValueError, match=r"missing from `flipped`.*\['zz'\]"):
        drop_precision_recall(["a", "zz"], FLIPPED)
    with pytest.raises(ValueError, match="repeated"):
        drop_precision_recall(["a", "a"], FLIPPED)


def test_auroc_extremes() -> None:
    labels = [False, False, True, True]
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0  # every positive above every negative
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0  # inverted detector
    assert auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # all ties count ½
    assert math.isnan(auroc([0.1, 0.2], [True, True]))  # no negatives
    assert math.isnan(auroc([], []))


def test_auroc_small_case_by_hand() -> None:
    # Positives 0.9, 0.4; negatives 0.4, 0.1, 0.7.
    #   0.9 beats all three: 3.   0.4 ties 0.4 (½), beats 0.1 (1), loses to 0.7 (0): 1.5.
    #   AUROC = 4.5 / (2·3) = 0.75.
    # By ranks: 0.1→1, 0.4,0.4→2.5 each, 0.7→4, 0.9→5; R₊ = 5 + 2.5 = 7.5; (7.5 − 3) / 6 = 0.75.
    assert auroc([0.9, 0.4, 0.4, 0.1, 0.7], [True, True, False, False, False]) == 0.75


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = random.Random(1)
    scores = [round(rng.gauss(0, 1), 1) for _ in range(60)]  # rounding makes many ties
    labels = [rng.random() < 0.3 for _ in range(60)]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert auroc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_auroc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one length"):
        auroc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match=r"finite.*\[1\]"):
        auroc([0.1, math.nan], [True, False])


def test_reward_accuracy_counts_ties_as_wrong() -> None:
    # 1.0 and 3.0 are right; 0.0 (a tie) and −2.0 are wrong: 2/4.
    assert reward_accuracy(torch.tensor([1.0, 0.0, -2.0, 3.0])) == 0.5
    assert reward_accuracy([0.0, 0.0]) == 0.0
    assert reward_accuracy([1e-9]) == 1.0
    assert math.isnan(reward_accuracy([]))


@pytest.mark.parametrize("loss_name", ["dpo", "ipo", "cdpo", "rdpo", "ropo"])
def test_every_loss_drops_the_pair_it_contradicts_most(loss_name: str) -> None:
    # The w-step as train.end_of_round runs it. Policy margins −5, 0, 5, 100 over a reference at 0:
    # "a" is the pair the policy contradicts most, "d" the one it agrees with most. IPO's loss
    # (Δ − 1/(2β))² is largest at "d", and so is cDPO's once t > ln((1−ε)/ε); ranking by those
    # losses would drop the most confidently correct pair. Ranking by the margin drops "a".
    loss_fn = get_loss(loss_name, beta=0.1)
    tokens = torch.ones(4)
    policy = PairLogps(torch.tensor([-5.0, 0.0, 5.0, 100.0]), torch.zeros(4), tokens, tokens)
    reference = PairLogps(torch.zeros(4), torch.zeros(4), tokens, tokens)
    losses, margins = pair_losses(loss_fn, policy, reference)
    decision = select_drops(["a", "b", "c", "d"], margins, rho=0.25)
    assert decision.dropped_ids == ("a",)
    if loss_name in ("ipo", "cdpo"):  # the trap the margin avoids
        assert losses.argmax().item() == 3
    else:
        assert losses.argmax().item() == 0
