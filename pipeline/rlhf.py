"""The RLHF math, as small pure functions on tensors (no models, no I/O), each unit-tested by hand.

Reward model (InstructGPT, Ouyang et al. 2022, eq. 1): a labeler ranks K completions of one prompt; the
ranking gives every pair with different ranks as a comparison (winner w, loser l), and

    loss = −1/C(K,2) · Σ_(w,l) log σ(r(x, y_w) − r(x, y_l))

with all comparisons of one prompt in one batch element. Ties give no pair, so a prompt's loss is the mean
over its own non-tied pairs, and a batch averages prompts with equal weight (a prompt with 6 pairs counts
as much as a prompt with 1, as dividing by C(K,2) does).

A batch of G prompts is flattened to N = Σ K_g completions; pairs are rows of indices into that flat
vector, and `pair_group[p]` says which prompt pair p belongs to.
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
    """
    diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    if margins is not None:
        diff = diff - margins
    per_pair = -F.logsigmoid(diff)
    loss = per_group_mean(per_pair, pair_group, num_groups).mean()
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
