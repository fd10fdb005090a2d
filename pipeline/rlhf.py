"""The RLHF math, as small pure functions on tensors (no models, no I/O), each unit-tested by hand.

Reward model (InstructGPT, Ouyang et al. 2022, eq. 1): a labeler ranks K completions of one prompt; the
ranking gives every pair with different ranks as a comparison (winner w, loser l), and

    loss = −1/C(K,2) · Σ_(w,l) log σ(r(x, y_w) − r(x, y_l))

with all comparisons of one prompt in one batch element. Ties give no pair, so a prompt's loss is the mean
over its own non-tied pairs, and a batch averages prompts with equal weight (a prompt with 6 pairs counts
as much as a prompt with 1, as dividing by C(K,2) does).

A batch of G prompts is flattened to N = Σ K_g completions; pairs are rows of indices into that flat
vector, and `pair_group[p]` says which prompt pair p belongs to.

PPO (Ziegler et al. 2019; InstructGPT; "The N+ implementation details of RLHF with PPO"): a batch of B
completions is a [B, T] grid of completion tokens with a 0/1 `mask` that is 1 up to and including each
completion's EOS and 0 after it (and on padding). Every function below takes that mask, so nothing after
EOS counts in any loss, KL, whitening statistic or metric. Sequence-level numbers (the KL of a completion)
are sums over its tokens; token-level losses are means over the batch's real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_group_mean(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of `values` within each group: `group[i]` in [0, num_groups) is the group of `values[i]`.

    Groups with no member get 0 (they never occur in a valid batch; the RM data loader rejects them).
    """
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    counts = torch.bincount(group, minlength=num_groups).to(values.dtype)
    return sums / counts.clamp(min=1)


def ranking_loss(
    rewards: torch.Tensor,
    pairs: torch.Tensor,
    pair_group: torch.Tensor,
    num_groups: int,
    margins: torch.Tensor | None = None,
    completion_group: torch.Tensor | None = None,
    center_coef: float = 0.0,
    group_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstructGPT's K-way ranking loss, averaged per prompt, then over prompts.

    Args:
        rewards: [N] scalar reward of every completion in the batch.
        pairs: [P, 2] (winner index, loser index) into `rewards`.
        pair_group: [P] prompt index of each pair.
        num_groups: G, the number of prompts in the batch.
        margins: optional [P] margin m each pair must win by: −log σ(r_w − r_l − m) (Llama 2's margin term).
        completion_group: [N] prompt index of each completion; needed when `center_coef` > 0.
        center_coef: weight c of the reward-centering term c · mean_g (mean_k r_gk)², which pins each
            prompt's average reward near 0 without changing any comparison (Eisenstein et al. 2023 use the
            pairwise form (r_w + r_l)²).
        group_weights: optional [G] weight of each prompt in the mean over prompts (a weighted mean: Σ w_g l_g / Σ w_g),
            e.g. a later RLHF round's rankings of its policy's samples counted more than the original rankings.
    """
    diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    if margins is not None:
        diff = diff - margins
    per_pair = -F.logsigmoid(diff)
    per_group = per_group_mean(per_pair, pair_group, num_groups)
    if group_weights is None:
        loss = per_group.mean()
    else:
        w = group_weights.to(per_group.dtype)
        loss = (per_group * w).sum() / w.sum()
    if center_coef:
        if completion_group is None:
            raise ValueError("center_coef > 0 needs completion_group")
        loss = loss + center_coef * per_group_mean(rewards, completion_group, num_groups).pow(2).mean()
    return loss


def pairwise_correct(rewards: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """[P] 1 where the winner scores higher, 0.5 on an exact tie (a coin flip), 0 where the loser wins."""
    diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    return (diff > 0).to(rewards.dtype) + 0.5 * (diff == 0).to(rewards.dtype)


def rank_margins(ranks: torch.Tensor, pairs: torch.Tensor, margin: float) -> torch.Tensor:
    """[P] margin per pair: `margin` times how many ranks apart the two completions are (1 for adjacent)."""
    return margin * (ranks[pairs[:, 1]] - ranks[pairs[:, 0]]).to(torch.float32)


# ------------------------------------------------------------------------------------------------- PPO


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | float | None) -> torch.Tensor:
    """Sum of `values` over real tokens divided by `num_tokens` (default: their count)."""
    if num_tokens is None:
        return masked_mean(values, mask)
    return (values * mask).sum() / num_tokens


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default, as in TRL and the N+ details)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> torch.Tensor:
    """(values − mean) / std over the masked entries; masked-out entries come back as 0.

    `mean` and `var` default to the masked statistics of `values`; under N processes the stage passes the
    global ones, so every process whitens with the whole batch's statistics. `shift_mean=False` only scales
    (used for rewards, whose sign carries meaning).
    """
    if mean is None:
        mean = masked_mean(values, mask)
    if var is None:
        var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def completion_mask(tokens: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] mask, [B] ended) of sampled completion tokens: 1 up to and including the first EOS.

    Tokens after the first EOS are padding that `generate` appended (they may even be EOS ids, when the
    tokenizer pads with EOS). A completion with no EOS ran out of budget: all of its tokens count.
    """
    is_eos = tokens == eos_token_id
    ended = is_eos.any(dim=1)
    # Number of EOS seen strictly before each position: a token counts while none has been seen yet.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).to(torch.float32), ended


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last masked-in token (its EOS, or its last token when it never ended)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] log-probability of each token under `logits` [B, T, V] (logits[:, t] predicts tokens[:, t])."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` and, without gradient, each position's entropy −Σ p·log p, from one log-softmax
    over the vocabulary (the one the log-probs' backward keeps anyway) instead of a second pass for the entropy."""
    logp = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1), entropy


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, T] entropy of each position's next-token distribution: logsumexp(z) − Σ softmax(z)·z."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def kl_estimates(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (k1, k3) estimates of KL(π ‖ π_ref) from tokens sampled from π (Schulman's estimators).

    k1 = log π − log π_ref (unbiased, can be negative; the one in the reward); with r = π_ref / π,
    k3 = (r − 1) − log r (unbiased, never negative, lower variance; for logging).
    """
    log_ratio = ref_logprobs - logprobs
    return -log_ratio, torch.expm1(log_ratio) - log_ratio


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] rewards, [B, T] k1 KL) of InstructGPT's objective, per completion token.

    Every real token t gets −β (log π(a_t|s_t) − log π_ref(a_t|s_t)); the reward model's score of the whole
    completion ([B] `scores`) is added at the last real token. Tokens after EOS get nothing.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = last_token_index(mask)
    rewards = rewards.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] advantages, [B, T] returns) by generalized advantage estimation over completion tokens.

    δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, where V and A beyond a completion's last real
    token are 0 (the episode ended). Returns = A + V are the value targets. Masked-out entries are 0.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    num_tokens: torch.Tensor | float | None = None,
    log_ratio_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, token-level: mean over real tokens of max(−A·ρ, −A·clip(ρ, 1±ε)).

    `log_ratio_clamp` c bounds each token's log ρ to [−c, c] before the exp (OpenRLHF's safeguard): with a
    negative advantage the unclipped term −A·ρ is the max and grows as e^(log ρ), so one token whose log-ratio
    reached ~100 nats makes the loss inf (float32 overflows at e^88.7). A clamped token contributes −A·e^c and
    no gradient. None (default) leaves ρ untouched, identical to TRL; c = 20 changes no realistic token.

    `num_tokens` is the mean's denominator (default: the real tokens of `mask`). Data-parallel runs pass
    the minibatch's token count over all processes divided by their number, so that the gradient averaged
    over processes is the gradient of the mean over every token, as one process would compute it.
    Also returns the clip fraction (share of tokens where the clipped term is the active one) and the
    approximate KL between the new and the old policy (k3 estimator, mean per token).
    """
    # Masked before exp: a padding position's log-ratio never overflows into an inf (and 0 · inf = NaN).
    log_ratio = (logprobs - old_logprobs) * mask
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction) of the clipped value loss ½ · mean max((V − R)², (V_clip − R)²), where V_clip
    keeps the new value within ±clip_range of the value at rollout time. `num_tokens`: as in `policy_loss`."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(unclipped_err, clipped_err), mask, num_tokens)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask).detach()


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM loss, mean over predicted tokens: −log π(x_{t+1} | x_≤t) (the ptx term's E[log π(x)])."""
    logprobs = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    mask = torch.ones_like(logprobs) if attention_mask is None else attention_mask[:, 1:].to(logprobs.dtype)
    return -masked_mean(logprobs, mask)


def ppo_ptx_loss(
    pg_loss: torch.Tensor, vf_loss: torch.Tensor, ptx: torch.Tensor | None, vf_coef: float, ptx_coef: float
) -> torch.Tensor:
    """The loss PPO-ptx minimizes: policy loss + c_v · value loss + γ_ptx · pretraining LM loss.

    Minimizing γ_ptx · LM loss is maximizing InstructGPT's γ · E_pretrain[log π(x)]; γ_ptx = 0 is plain PPO.
    """
    loss = pg_loss + vf_coef * vf_loss
    if ptx is not None and ptx_coef:
        loss = loss + ptx_coef * ptx
    return loss


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: float, n: int) -> float:
    """Ziegler et al. (2019)'s controller: e = clip(KL / target − 1, −0.2, 0.2), β ← β (1 + e · n / horizon).

    `kl` is the batch's mean KL per completion (nats), `n` the number of completions it was measured on.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over real tokens: 1 is a perfect value function, ≤ 0 one no better than a constant."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8)
