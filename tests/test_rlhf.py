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


def test_group_weights_make_a_weighted_mean_over_prompts() -> None:
    """rm.extra_weight: prompt B weighing 3 counts as three copies of it would; all weights 1 is the plain mean."""
    loss = rlhf.ranking_loss(REWARDS, PAIRS, PAIR_GROUP, 2, group_weights=torch.tensor([1.0, 3.0]))
    assert float(loss) == pytest.approx((LOSS_A + 3 * LOSS_B) / 4, abs=1e-6)
    ones = rlhf.ranking_loss(REWARDS, PAIRS, PAIR_GROUP, 2, group_weights=torch.ones(2))
    assert float(ones) == pytest.approx((LOSS_A + LOSS_B) / 2, abs=1e-6)


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


# ------------------------------------------------------------------------------------------------- PPO
# Masks below: row 0 has 3 real tokens (EOS at t = 2), row 1 has 2 (EOS at t = 1); 1e6-sized garbage sits
# after EOS, where it must change nothing (garbage stays finite: the functions mask by multiplying).
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
VALS = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, 5.0, -1e6, 1e6]])
CLEAN = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])  # VALS with the garbage zeroed
REAL = MASK.bool()


def test_masked_mean_counts_only_real_tokens() -> None:
    # (1 + 2 + 3 + 4 + 5) / 5 = 3
    assert float(rlhf.masked_mean(VALS, MASK)) == pytest.approx(3.0)
    # per row: (1 + 2 + 3) / 3 = 2, (4 + 5) / 2 = 4.5
    assert rlhf.masked_mean(VALS, MASK, dim=1).tolist() == pytest.approx([2.0, 4.5])
    # per column: counts [2, 2, 1, 0] → (1 + 4) / 2, (2 + 5) / 2, 3 / 1, 0 / max(0, 1) = 0
    assert rlhf.masked_mean(VALS, MASK, dim=0).tolist() == pytest.approx([2.5, 3.5, 3.0, 0.0])


def test_masked_var_is_bessel_corrected_over_real_tokens() -> None:
    # 1..5: mean 3, squared deviations 4 + 1 + 0 + 1 + 4 = 10 → 10 / 4 = 2.5 unbiased, 10 / 5 = 2 biased
    assert float(rlhf.masked_var(VALS, MASK)) == pytest.approx(2.5)
    assert float(rlhf.masked_var(VALS, MASK, unbiased=False)) == pytest.approx(2.0)
    assert float(rlhf.masked_var(CLEAN, MASK)) == pytest.approx(2.5)


def test_masked_whiten_zero_mean_unit_variance_over_real_tokens() -> None:
    w = rlhf.masked_whiten(VALS, MASK)
    # (v − 3) / √2.5: 2/√2.5 = 1.2649111, 1/√2.5 = 0.6324555
    a, b = 1.2649111, 0.6324555
    assert w.tolist()[0] == pytest.approx([-a, -b, 0.0, 0.0], abs=1e-6)
    assert w.tolist()[1] == pytest.approx([b, a, 0.0, 0.0], abs=1e-6)  # masked-out entries come back as 0
    assert float(rlhf.masked_mean(w, MASK)) == pytest.approx(0.0, abs=1e-6)
    assert float(rlhf.masked_var(w, MASK)) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(w, rlhf.masked_whiten(CLEAN, MASK))


def test_masked_whiten_without_shifting_keeps_the_mean() -> None:
    w = rlhf.masked_whiten(VALS, MASK, shift_mean=False)
    # (v − 3) / √2.5 + 3
    a, b = 1.2649111, 0.6324555
    assert w.tolist()[0] == pytest.approx([3 - a, 3 - b, 3.0, 0.0], abs=1e-6)
    assert w.tolist()[1] == pytest.approx([3 + b, 3 + a, 0.0, 0.0], abs=1e-6)
    assert float(rlhf.masked_mean(w, MASK)) == pytest.approx(3.0, abs=1e-6)
    assert float(rlhf.masked_var(w, MASK)) == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_uses_given_statistics() -> None:
    # global mean 1, var 4 (from other processes): (v − 1) / 2
    w = rlhf.masked_whiten(VALS, MASK, mean=torch.tensor(1.0), var=torch.tensor(4.0))
    assert w.flatten().tolist() == pytest.approx([0.0, 0.5, 1.0, 0.0, 1.5, 2.0, 0.0, 0.0], abs=1e-6)
    w = rlhf.masked_whiten(VALS, MASK, shift_mean=False, mean=torch.tensor(1.0), var=torch.tensor(4.0))
    assert w.flatten().tolist() == pytest.approx([1.0, 1.5, 2.0, 0.0, 2.5, 3.0, 0.0, 0.0], abs=1e-6)


def test_completion_mask_stops_at_the_first_eos() -> None:
    eos = 2  # this tokenizer pads with EOS
    tokens = torch.tensor(
        [
            [5, 7, 2, 2],  # EOS at 2, then an EOS-id pad: excluded
            [5, 2, 9, 2],  # EOS at 1; a non-EOS token and a later EOS after it: both excluded
            [3, 4, 6, 8],  # no EOS: ran out of budget, every token counts
            [2, 5, 5, 5],  # EOS first: only the EOS counts
        ]
    )
    mask, ended = rlhf.completion_mask(tokens, eos)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, True, False, True]
    assert rlhf.last_token_index(mask).tolist() == [2, 1, 3, 0]


def test_last_token_index_is_eos_or_last_token() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert rlhf.last_token_index(mask).tolist() == [2, 1, 3]


# log-softmax of [0, ln 2, ln 5]: softmax 1/8, 2/8, 5/8 → ln(1/8) = −2.0794415, ln(1/4) = −1.3862944,
# ln(5/8) = −0.4700036; of a uniform [c, c, c]: −ln 3 = −1.0986123 (a constant shift changes nothing).
L2, L5 = math.log(2), math.log(5)


def test_logprobs_from_logits_by_hand() -> None:
    logits = torch.tensor(
        [
            [[0.0, L2, L5], [3.0, 3.0, 3.0]],
            [[7.0, 7 + L2, 7 + L5], [0.0, L2, L5]],
        ]
    )
    tokens = torch.tensor([[2, 0], [0, 1]])
    lp = rlhf.logprobs_from_logits(logits, tokens)
    assert lp.shape == (2, 2)
    assert lp.tolist()[0] == pytest.approx([-0.4700036, -1.0986123], abs=1e-6)
    assert lp.tolist()[1] == pytest.approx([-2.0794415, -1.3862944], abs=1e-6)
    # half-precision logits are upcast before the softmax
    assert rlhf.logprobs_from_logits(logits.bfloat16(), tokens).dtype == torch.float32


def test_entropy_from_logits() -> None:
    # uniform over V = 5 → ln 5 = 1.6094379, whatever the constant
    uniform = torch.full((2, 3, 5), 100.0)
    assert rlhf.entropy_from_logits(uniform).shape == (2, 3)
    assert rlhf.entropy_from_logits(uniform).flatten().tolist() == pytest.approx([1.6094379] * 6, abs=1e-5)
    # [0, ln 3]: p = (1/4, 3/4), H = ¼ ln 4 + ¾ ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    two = torch.tensor([[[0.0, math.log(3)]]])
    assert float(rlhf.entropy_from_logits(two)) == pytest.approx(0.5623351, abs=1e-6)
    # a certain next token: entropy 0
    assert float(rlhf.entropy_from_logits(torch.tensor([[[0.0, 1e4]]]))) == pytest.approx(0.0, abs=1e-6)


def test_logprobs_and_entropy_from_one_log_softmax_agree_with_the_two_functions() -> None:
    """What the PPO update reads: the same log-probs (with gradient) and entropies (without) as the two functions."""
    logits = torch.tensor([[[0.0, L2, L5], [3.0, 3.0, 3.0]], [[0.0, math.log(3), -1e4], [0.0, 1e4, 0.0]]],
                          requires_grad=True)
    tokens = torch.tensor([[2, 0], [1, 1]])
    lp, entropy = rlhf.logprobs_and_entropy(logits, tokens)
    assert torch.allclose(lp, rlhf.logprobs_from_logits(logits, tokens), atol=1e-6)
    assert torch.allclose(entropy, rlhf.entropy_from_logits(logits), atol=1e-6)
    # by hand: (1, 2, 5) weights, uniform over 3, the [0, ln 3] pair of the test above, a certain token
    assert entropy.tolist()[1] == pytest.approx([0.5623351, 0.0], abs=1e-6)
    assert entropy.tolist()[0][1] == pytest.approx(math.log(3), abs=1e-6)
    assert lp.requires_grad and not entropy.requires_grad


def test_kl_estimates_k1_and_k3_by_hand() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    k1, k3 = rlhf.kl_estimates(logprobs, ref)
    # k1 = log π − log π_ref = 0.5, −1.0, 0
    assert k1.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    # log r = log π_ref − log π = −0.5, 1, 0; k3 = (r − 1) − log r:
    #   e^−0.5 − 1 + 0.5 = 0.1065307, e − 1 − 1 = 0.7182818, 0
    assert k3.tolist()[0] == pytest.approx([0.1065307, 0.7182818, 0.0], abs=1e-6)
    # k3 is never negative, even where k1 is
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=g) * 3, torch.randn(64, 16, generator=g) * 3
    assert bool((rlhf.kl_estimates(a, b)[1] >= 0).all())


def test_per_token_rewards_kl_on_real_tokens_score_at_the_last() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # row 0 never ended; row 1 EOS at 1
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-0.2, -0.4, 1e6, -1e6]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -2.0], [-0.7, -0.1, -1e6, 1e6]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = rlhf.per_token_rewards(scores, logprobs, ref, mask, beta=0.1)
    # k1: row 0: 0.5, −1, 0, 1; row 1: 0.5, −0.3, then nothing
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0, 1.0], abs=1e-6)
    assert kl.tolist()[1] == pytest.approx([0.5, -0.3, 0.0, 0.0], abs=1e-6)
    # −0.1 · k1, plus the score at the last real token: row 0 at t = 3 (−0.1 + 2), row 1 at EOS t = 1
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.1, 0.0, 1.9], abs=1e-6)
    assert rewards.tolist()[1] == pytest.approx([-0.05, 0.03 - 1.0, 0.0, 0.0], abs=1e-6)
    clean_lp = logprobs * mask
    clean_ref = ref * mask
    assert torch.equal(rlhf.per_token_rewards(scores, clean_lp, clean_ref, mask, 0.1)[0], rewards)
    # β = 0: the score alone
    rewards0, _ = rlhf.per_token_rewards(scores, logprobs, ref, mask, beta=0.0)
    assert rewards0.flatten().tolist() == pytest.approx([0, 0, 0, 2.0, 0, -1.0, 0, 0])


def test_gae_by_hand() -> None:
    # γ = 0.9, λ = 0.5 → γλ = 0.45; V beyond the last token is 0
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    adv, ret = rlhf.gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    # δ2 = 1.0 + 0 − 0.8 = 0.2                      A2 = 0.2
    # δ1 = −0.2 + 0.9·0.8 − 0.4 = 0.12             A1 = 0.12 + 0.45·0.2 = 0.21
    # δ0 = 0.1 + 0.9·0.4 − 0.5 = −0.04             A0 = −0.04 + 0.45·0.21 = 0.0545
    assert adv.tolist()[0] == pytest.approx([0.0545, 0.21, 0.2], abs=1e-6)
    # returns = A + V
    assert ret.tolist()[0] == pytest.approx([0.5545, 0.61, 1.0], abs=1e-6)


def test_gae_stops_at_eos() -> None:
    # row 0: the example above, EOS at t = 2; row 1: EOS at t = 1. Garbage after EOS must not bootstrap.
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.1, -0.2, 1.0, 1e6], [0.3, 2.0, 1e6, -1e6]])
    values = torch.tensor([[0.5, 0.4, 0.8, 1e6], [1.0, 0.5, 1e6, 1e6]])
    adv, ret = rlhf.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: δ1 = 2.0 + 0.9·0 − 0.5 = 1.5            A1 = 1.5
    #        δ0 = 0.3 + 0.9·0.5 − 1.0 = −0.25         A0 = −0.25 + 0.45·1.5 = 0.425
    assert adv.tolist()[0] == pytest.approx([0.0545, 0.21, 0.2, 0.0], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx([0.425, 1.5, 0.0, 0.0], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.5545, 0.61, 1.0, 0.0], abs=1e-6)
    assert ret.tolist()[1] == pytest.approx([1.425, 2.0, 0.0, 0.0], abs=1e-6)
    adv2, ret2 = rlhf.gae_advantages(rewards * mask, values * mask, mask, gamma=0.9, lam=0.5)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    adv, ret = rlhf.gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # reward to go: 0.9, 0.8, 1.0
    assert ret.tolist()[0] == pytest.approx([0.9, 0.8, 1.0], abs=1e-6)
    assert adv.tolist()[0] == pytest.approx([0.4, 0.4, 0.2], abs=1e-6)


def _policy_case(garbage: float) -> tuple[torch.Tensor, ...]:
    # ε = 0.2. Tokens (A, ρ): a (+1, 1.1) inside; b (+1, 1.5) above; c (−2, 0.5) below;
    # d (−2, 1.5) above; e (+1, 0.5) below; then one padding token.
    ratio = torch.tensor([[1.1, 1.5, 0.5], [1.5, 0.5, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, garbage]])
    new = old + torch.log(ratio)
    new[1, 2] = -garbage
    adv = torch.tensor([[1.0, 1.0, -2.0], [-2.0, 1.0, garbage]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return new, old, adv, mask


def test_policy_loss_clipping_by_hand() -> None:
    new, old, adv, mask = _policy_case(garbage=30.0)
    new.requires_grad_(True)
    loss, stats = rlhf.policy_loss(new, old, adv, mask, clip_range=0.2)
    assert loss.requires_grad and not stats["clip_frac"].requires_grad
    # max(−Aρ, −A·clip(ρ, 0.8, 1.2)):
    #   a: max(−1.1, −1.1) = −1.1          (inside the range)
    #   b: max(−1.5, −1.2) = −1.2          clipped (no credit for pushing ρ above 1 + ε)
    #   c: max(1.0, 1.6)   = 1.6           clipped (no credit for pushing ρ below 1 − ε)
    #   d: max(3.0, 2.4)   = 3.0           unclipped (the pessimistic term; the move is penalized in full)
    #   e: max(−0.5, −0.8) = −0.5          unclipped
    # mean over 5 real tokens: (−1.1 − 1.2 + 1.6 + 3.0 − 0.5) / 5 = 1.8 / 5 = 0.36
    assert float(loss.detach()) == pytest.approx(0.36, abs=1e-6)
    assert float(stats["clip_frac"]) == pytest.approx(2 / 5)
    # (ρ − 1) − ln ρ: 1.1 → 0.0046898, 1.5 → 0.0945349, 0.5 → 0.1931472
    # (0.0046898 + 0.0945349 + 0.1931472 + 0.0945349 + 0.1931472) / 5 = 0.5800540 / 5 = 0.1160108
    assert float(stats["approx_kl"]) == pytest.approx(0.1160108, abs=1e-6)
    # gradient: d(−Aρ)/d log π = −Aρ / 5 where unclipped, 0 where clipped, 0 on padding
    loss.backward()
    assert new.grad.flatten().tolist() == pytest.approx([-1.1 / 5, 0.0, 0.0, 3.0 / 5, -0.5 / 5, 0.0], abs=1e-6)
    # the garbage after EOS changes nothing
    loss0, stats0 = rlhf.policy_loss(*_policy_case(garbage=0.0), clip_range=0.2)
    assert float(loss0) == pytest.approx(0.36, abs=1e-6)
    assert float(stats0["approx_kl"]) == pytest.approx(float(stats["approx_kl"]), abs=1e-6)
    assert float(stats0["clip_frac"]) == float(stats["clip_frac"])


def test_policy_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -2.0, 4.0]])
    loss, stats = rlhf.policy_loss(lp, lp.clone(), adv, torch.ones(1, 3), clip_range=0.2)
    assert float(loss) == pytest.approx(-1.0)  # −(1 − 2 + 4) / 3
    assert float(stats["clip_frac"]) == 0.0
    assert float(stats["approx_kl"]) == 0.0


def test_policy_loss_log_ratio_clamp_keeps_a_runaway_token_finite() -> None:
    # Two real tokens, both with advantage −1. Token a: log ρ = 100 nats (a token whose probability collapsed
    # under π_old and recovered); token b: log ρ = ln 1.1.
    old = torch.tensor([[-100.0, -1.0]])
    new = torch.tensor([[0.0, -1.0 + math.log(1.1)]])
    adv = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2)
    # Unclamped: max(−A·ρ, −A·clip(ρ)) = ρ for a, and e^100 overflows float32 (max ~3.4e38 = e^88.7): inf.
    loss, _ = rlhf.policy_loss(new, old, adv, mask, clip_range=0.2)
    assert math.isinf(float(loss))
    # Clamped at 20 nats: a contributes max(e^20, 1.2) = e^20 = 485165195.41, b max(1.1, 1.1) = 1.1;
    # mean (485165195.41 + 1.1) / 2 = 242582598.26
    new.requires_grad_(True)
    loss, stats = rlhf.policy_loss(new, old, adv, mask, clip_range=0.2, log_ratio_clamp=20.0)
    assert float(loss) == pytest.approx((math.exp(20) + 1.1) / 2, rel=1e-6)
    # the clamped token gets no gradient (the clamp is flat there); b gets d(−Aρ)/d log π / 2 = 1.1 / 2
    loss.backward()
    assert new.grad.flatten().tolist() == pytest.approx([0.0, 0.55], abs=1e-6)
    assert math.isfinite(float(stats["approx_kl"]))
    # A generous clamp changes nothing where no token reaches it: the hand case of
    # test_policy_loss_clipping_by_hand gives its 0.36 with and without a clamp at 20 nats.
    case = _policy_case(garbage=30.0)
    assert float(rlhf.policy_loss(*case, clip_range=0.2, log_ratio_clamp=20.0)[0]) == pytest.approx(0.36, abs=1e-6)


def test_token_losses_split_over_processes_average_to_the_whole_batch_loss() -> None:
    # Data parallelism: each of N processes holds part of a minibatch and gradients are averaged. Row 0 of
    # the hand case has 3 real tokens, row 1 has 2: per-row masked means would weight row 1's tokens 3/2 as
    # much. With num_tokens = (3 + 2) / N = 2.5 each process's loss is its token sum / 2.5, and the mean of
    # the two is the whole batch's loss, 0.36 (see test_policy_loss_clipping_by_hand).
    new, old, adv, mask = _policy_case(garbage=30.0)
    halves = [rlhf.policy_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.2, num_tokens=2.5)[0]
              for i in range(2)]
    # row 0: (−1.1 − 1.2 + 1.6) / 2.5 = −0.28; row 1: (3.0 − 0.5) / 2.5 = 1.0; mean 0.36
    assert [float(h) for h in halves] == pytest.approx([-0.28, 1.0], abs=1e-6)
    assert float(sum(halves) / 2) == pytest.approx(0.36, abs=1e-6)
    # per-row means instead: (−0.7 / 3 + 2.5 / 2) / 2 = 0.5083, not the batch's 0.36
    plain = [float(rlhf.policy_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.2)[0])
             for i in range(2)]
    assert sum(plain) / 2 == pytest.approx(0.508333, abs=1e-5)
    # the value loss: ½ · (0.81 + 0.64 + 2.25) / 2.5 and ½ · (0.25 + 0.64) / 2.5 average to 0.459
    v_old = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1e6]])
    v_new = torch.tensor([[1.1, 1.5, 1.5], [-0.5, -0.5, -1e6]])
    ret = torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, 1e6]])
    v = [rlhf.value_loss(v_new[i : i + 1], v_old[i : i + 1], ret[i : i + 1], mask[i : i + 1], 0.2, num_tokens=2.5)[0]
         for i in range(2)]
    assert float(sum(v) / 2) == pytest.approx(0.459, abs=1e-6)


def test_value_loss_clipped_and_unclipped_by_hand() -> None:
    old = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1e6]])
    new = torch.tensor([[1.1, 1.5, 1.5], [-0.5, -0.5, -1e6]])
    ret = torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, 1e6]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # ε = 0.2: V_clip = old + clip(new − old, ±0.2); max((V − R)², (V_clip − R)²):
    #   V 1.1, V_clip 1.1, R 2:   0.81 vs 0.81 → 0.81  not clipped (inside the range)
    #   V 1.5, V_clip 1.2, R 2:   0.25 vs 0.64 → 0.64  clipped
    #   V 1.5, V_clip 1.2, R 0:   2.25 vs 1.44 → 2.25  not clipped
    #   V −0.5, V_clip −0.2, R 0: 0.25 vs 0.04 → 0.25  not clipped
    #   V −0.5, V_clip −0.2, R −1: 0.25 vs 0.64 → 0.64 clipped
    # ½ · (0.81 + 0.64 + 2.25 + 0.25 + 0.64) / 5 = ½ · 0.918 = 0.459
    loss, clip_frac = rlhf.value_loss(new, old, ret, mask, clip_range=0.2)
    assert float(loss) == pytest.approx(0.459, abs=1e-6)
    assert float(clip_frac) == pytest.approx(2 / 5)
    # a wide range never clips: ½ · (0.81 + 0.25 + 2.25 + 0.25 + 0.25) / 5 = ½ · 0.762 = 0.381
    loss, clip_frac = rlhf.value_loss(new, old, ret, mask, clip_range=10.0)
    assert float(loss) == pytest.approx(0.381, abs=1e-6)
    assert float(clip_frac) == 0.0
    # the garbage after EOS changes nothing
    loss, clip_frac = rlhf.value_loss(new * mask, old * mask, ret * mask, mask, clip_range=0.2)
    assert float(loss) == pytest.approx(0.459, abs=1e-6)
    assert float(clip_frac) == pytest.approx(2 / 5)


def test_lm_loss_shifts_by_one_by_hand() -> None:
    # logits[:, t] predicts input_ids[:, t + 1]; the last position predicts nothing (garbage there)
    logits = torch.tensor([[[0.0, L2, L5], [3.0, 3.0, 3.0], [1e4, -1e4, 0.0]]])
    ids = torch.tensor([[0, 2, 1]])
    # −(ln(5/8) + ln(1/3)) / 2 = (0.4700036 + 1.0986123) / 2 = 0.7843080
    assert float(rlhf.lm_loss(logits, ids)) == pytest.approx(0.7843080, abs=1e-6)
    assert float(rlhf.lm_loss(logits, ids, torch.ones(1, 3))) == pytest.approx(0.7843080, abs=1e-6)


def test_lm_loss_attention_mask_excludes_padding() -> None:
    # row 1 is [1, 0, PAD]: its prediction of the pad (garbage logits, −2e4 log-prob) must not count
    logits = torch.tensor(
        [
            [[0.0, L2, L5], [3.0, 3.0, 3.0], [1e4, -1e4, 0.0]],
            [[0.0, math.log(3), 0.0], [-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]],
        ]
    )
    ids = torch.tensor([[0, 2, 1], [1, 0, 0]])
    attn = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 1 predicts 0 from [0, ln 3, 0]: softmax (1/5, 3/5, 1/5) → −ln(1/5) = 1.6094379
    # (0.4700036 + 1.0986123 + 1.6094379) / 3 = 1.0593513
    assert float(rlhf.lm_loss(logits, ids, attn)) == pytest.approx(1.0593513, abs=1e-6)
    assert float(rlhf.lm_loss(logits, ids)) > 1e3  # without the mask, the pad's 2e4 counts


def test_ppo_ptx_loss_combines_the_terms() -> None:
    pg, vf, ptx = torch.tensor(0.5), torch.tensor(2.0), torch.tensor(3.0)
    # 0.5 + 0.1 · 2 + 0.25 · 3 = 1.45
    assert float(rlhf.ppo_ptx_loss(pg, vf, ptx, vf_coef=0.1, ptx_coef=0.25)) == pytest.approx(1.45)
    # plain PPO: 0.5 + 0.1 · 2 = 0.7
    assert float(rlhf.ppo_ptx_loss(pg, vf, ptx, vf_coef=0.1, ptx_coef=0.0)) == pytest.approx(0.7)
    assert float(rlhf.ppo_ptx_loss(pg, vf, None, vf_coef=0.1, ptx_coef=0.25)) == pytest.approx(0.7)
    nan = torch.tensor(float("nan"))  # with γ_ptx = 0 the ptx term is left out, not multiplied by 0
    assert float(rlhf.ppo_ptx_loss(pg, vf, nan, vf_coef=0.1, ptx_coef=0.0)) == pytest.approx(0.7)


def test_adaptive_kl_beta_by_hand() -> None:
    # KL 6 vs target 5: e = 0.2 → 0.1 · (1 + 0.2 · 64 / 10000) = 0.1 · 1.00128 = 0.100128
    assert rlhf.adaptive_kl_beta(0.1, kl=6.0, target=5.0, horizon=10000, n=64) == pytest.approx(0.100128)
    # KL 20: e = 3 clipped to 0.2 → the same step
    assert rlhf.adaptive_kl_beta(0.1, kl=20.0, target=5.0, horizon=10000, n=64) == pytest.approx(0.100128)
    # KL 0: e = −1 clipped to −0.2 → 0.1 · (1 − 0.00128) = 0.099872
    assert rlhf.adaptive_kl_beta(0.1, kl=0.0, target=5.0, horizon=10000, n=64) == pytest.approx(0.099872)
    # unclipped: KL 5.5 → e = 0.1 → 0.1 · 1.00064; KL 4.5 → e = −0.1 → 0.1 · 0.99936
    assert rlhf.adaptive_kl_beta(0.1, kl=5.5, target=5.0, horizon=10000, n=64) == pytest.approx(0.100064)
    assert rlhf.adaptive_kl_beta(0.1, kl=4.5, target=5.0, horizon=10000, n=64) == pytest.approx(0.099936)
    # 10× the completions → 10× the step: 0.1 · (1 + 0.2 · 640 / 10000) = 0.10128
    assert rlhf.adaptive_kl_beta(0.1, kl=6.0, target=5.0, horizon=10000, n=640) == pytest.approx(0.10128)
    # on target: unchanged
    assert rlhf.adaptive_kl_beta(0.1, kl=5.0, target=5.0, horizon=10000, n=64) == pytest.approx(0.1)


def test_explained_variance() -> None:
    # returns 1..5 on the real tokens (Var = 2), garbage after EOS
    assert float(rlhf.explained_variance(VALS, VALS, MASK)) == pytest.approx(1.0)
    garbage_values = torch.tensor([[1.0, 2.0, 3.0, -1e6], [4.0, 5.0, 1e6, 7.0]])
    assert float(rlhf.explained_variance(garbage_values, VALS, MASK)) == pytest.approx(1.0)
    # constant at the mean (3): Var[R − V] = Var[R] → 0
    at_mean = torch.tensor([[3.0, 3.0, 3.0, 1e6], [3.0, 3.0, -1e6, 1e6]])
    assert float(rlhf.explained_variance(at_mean, VALS, MASK)) == pytest.approx(0.0, abs=1e-6)
    # V = 1, 2, 3, 4, 4: R − V = 0, 0, 0, 0, 1 (mean 0.2, Var (4 · 0.04 + 0.64) / 5 = 0.16) → 1 − 0.16 / 2 = 0.92
    close = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, 4.0, 1e6, -1e6]])
    assert float(rlhf.explained_variance(close, VALS, MASK)) == pytest.approx(0.92, abs=1e-6)
    # V = 6 − R: R − V = 2R − 6, Var 4 · 2 = 8 → 1 − 8 / 2 = −3 (worse than a constant)
    assert float(rlhf.explained_variance((6 - CLEAN) * MASK, CLEAN, MASK)) == pytest.approx(-3.0, abs=1e-6)
