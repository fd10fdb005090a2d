"""The RLHF math against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import rlhf


def softplus(x: float) -> float:  # −log σ(d) = log(1 + e^−d) = softplus(−d)
    return math.log1p(math.exp(x))


# Prompt A: K = 4, ranks [1, 2, 2, 3] (a tie between completions 1 and 2) → 5 pairs, not C(4,2) = 6:
#   (0,1) (0,2) (0,3) (1,3) (2,3); rewards [2.0, 1.0, 0.5, -1.0] → r_w − r_l = 1.0, 1.5, 3.0, 2.0, 1.5.
# Prompt B: K = 2, ranks [2, 1] → one pair (1,0); rewards [0.3, -0.2] → r_w − r_l = −0.5.
REWARDS = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.3, -0.2])
PAIRS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 3], [2, 3], [5, 4]])
PAIR_GROUP = torch.tensor([0, 0, 0, 0, 0, 1])
COMPLETION_GROUP = torch.tensor([0, 0, 0, 0, 1, 1])
RANKS = torch.tensor([1, 2, 2, 3, 2, 1])

# −log σ(d): d = 1.0 → 0.3132617, 1.5 → 0.2014133, 3.0 → 0.0485874, 2.0 → 0.1269280, −0.5 → 0.9740770
LOSS_A = (0.3132617 + 0.2014133 + 0.0485874 + 0.1269280 + 0.2014133) / 5  # 0.1783207
LOSS_B = 0.9740770


def test_hand_values_of_the_pair_losses() -> None:
    assert softplus(-1.0) == pytest.approx(0.3132617, abs=1e-7)
    assert softplus(-1.5) == pytest.approx(0.2014133, abs=1e-7)
    assert softplus(-3.0) == pytest.approx(0.0485874, abs=1e-7)
    assert softplus(-2.0) == pytest.approx(0.1269280, abs=1e-7)
    assert softplus(0.5) == pytest.approx(0.9740770, abs=1e-7)


def test_ranking_loss_averages_each_prompts_pairs_then_weights_prompts_equally() -> None:
    loss = rlhf.ranking_loss(REWARDS, PAIRS, PAIR_GROUP, num_groups=2)
    assert float(loss) == pytest.approx((LOSS_A + LOSS_B) / 2, abs=1e-6)  # 0.5761989
    # Not the per-pair mean (which would let the K = 4 prompt count five times as much as the K = 2 one).
    assert float(loss) != pytest.approx((LOSS_A * 5 + LOSS_B) / 6, abs=1e-3)


def test_one_prompt_is_instructgpts_mean_over_its_comparisons() -> None:
    loss = rlhf.ranking_loss(REWARDS[:4], PAIRS[:5], PAIR_GROUP[:5], num_groups=1)
    assert float(loss) == pytest.approx(LOSS_A, abs=1e-6)


def test_margin_is_per_rank_of_difference() -> None:
    margins = rlhf.rank_margins(RANKS, PAIRS, margin=0.5)
    # rank gaps: (0,1) 1, (0,2) 1, (0,3) 2, (1,3) 1, (2,3) 1, (5,4) 1
    assert margins.tolist() == [0.5, 0.5, 1.0, 0.5, 0.5, 0.5]
    loss = rlhf.ranking_loss(REWARDS, PAIRS, PAIR_GROUP, 2, margins=margins)
    # d − m: 0.5, 1.0, 2.0, 1.5, 1.0 | −1.0
    a = (softplus(-0.5) + softplus(-1.0) + softplus(-2.0) + softplus(-1.5) + softplus(-1.0)) / 5
    assert float(loss) == pytest.approx((a + softplus(1.0)) / 2, abs=1e-6)


def test_centering_term_penalizes_each_prompts_mean_reward() -> None:
    # prompt means: A (2 + 1 + 0.5 − 1) / 4 = 0.625, B (0.3 − 0.2) / 2 = 0.05; mean of squares 0.1965625
    loss = rlhf.ranking_loss(REWARDS, PAIRS, PAIR_GROUP, 2, completion_group=COMPLETION_GROUP, center_coef=0.1)
    assert float(loss) == pytest.approx((LOSS_A + LOSS_B) / 2 + 0.1 * 0.1965625, abs=1e-6)
    with pytest.raises(ValueError, match="completion_group"):
        rlhf.ranking_loss(REWARDS, PAIRS, PAIR_GROUP, 2, center_coef=0.1)


def test_ranking_loss_gradient_flows_to_every_completion_once() -> None:
    r = REWARDS.clone().requires_grad_(True)
    rlhf.ranking_loss(r, PAIRS, PAIR_GROUP, 2).backward()
    # d loss / d r_B1 (the K = 2 winner) = −σ(−d) / 2 prompts = −σ(0.5) / 2
    assert float(r.grad[5]) == pytest.approx(-1 / (1 + math.exp(-0.5)) / 2, abs=1e-6)
    assert float(r.grad.sum()) == pytest.approx(0.0, abs=1e-6)  # a shift of all rewards changes nothing


def test_pairwise_correct_counts_ties_as_half() -> None:
    rewards = torch.tensor([1.0, 2.0, 2.0, 0.0])
    pairs = torch.tensor([[0, 3], [0, 1], [1, 2]])
    assert rlhf.pairwise_correct(rewards, pairs).tolist() == [1.0, 0.0, 0.5]


def test_per_group_mean() -> None:
    values = torch.tensor([1.0, 3.0, 10.0])
    assert rlhf.per_group_mean(values, torch.tensor([0, 0, 1]), 2).tolist() == [2.0, 10.0]
