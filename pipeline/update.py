"""PPO's optimization of a scored rollout (the stage's step c) and the batch statistics around it, for N
processes under DDP or DeepSpeed ZeRO: minibatches are formed the same way for any process count, token losses are
divided by the whole minibatch's token count, and statistics are reduced over processes. The losses themselves are
in pipeline/rlhf.py; the PPO stage (pipeline/stages/ppo.py) calls this once per iteration.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pipeline import rlhf
from pipeline.config import PPOConfig
from pipeline.guards import PPOGuard
from pipeline.packing import can_pack, pack_rows, token_window
from pipeline.rollout import Rollout


def build_optimizer(params: list[torch.nn.Parameter], p: PPOConfig, accelerator: Accelerator) -> torch.optim.AdamW:
    """AdamW over the trained parameters. torch's fused kernel updates every tensor in one call (the default
    loops over them, a dozen small ops each: docs/performance.md); the same update within float rounding.
    DeepSpeed steps its own flattened partitions: there the plain AdamW is left to it."""
    fused = (accelerator.distributed_type != DistributedType.DEEPSPEED
             and accelerator.device.type in ("cpu", "cuda") and all(t.is_floating_point() for t in params))
    return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, eps=1e-5, fused=fused or None)


def ppo_update(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rollout: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    ptx_blocks: torch.Tensor | None,
    p: PPOConfig,
    seed: int,
    iteration: int,
    guard: PPOGuard | None = None,
) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in shuffled minibatches; one optimizer step per minibatch.

    The shuffle is per generation chunk (`_minibatches`), so every process count forms the same global
    minibatches from the same samples. `guard` checks the losses before `backward` and the gradient norm
    before `optimizer.step()`: a non-finite one stops the stage, or (nan_policy: skip) drops the minibatch.
    """
    model.train()
    context = rollout.context_length
    unwrapped = accelerator.unwrap_model(model)
    pack = can_pack(unwrapped.policy) and can_pack(unwrapped.value_model)
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for minibatches in _minibatches(p, seed, iteration, accelerator):
        for idx in minibatches:
            idx = idx.to(rollout.mask.device)
            mb = rollout.index(idx)
            # Only the columns these completions use (`token_window`), and policy logits only where a completion
            # token is predicted: the real tokens' numbers are the same as on the whole padded rollout.
            start, end = token_window(mb["attention_mask"], mb["mask"], context)
            ctx, n = context - start, end - context
            ids = mb["query_responses"][:, start:end]
            ptx_ids = None
            if ptx_blocks is not None:
                step_index = iteration * p.ppo_epochs * len(minibatches) + steps
                ptx_ids = _ptx_batch(ptx_blocks, step_index, p.ptx_batch_size, seed, accelerator)
            att, pos = mb["attention_mask"][:, start:end], mb["position_ids"][:, start:end]
            if pack:  # no padding at all: the rows' tokens side by side in fewer rows
                packed = pack_rows(ids, att, pos, ctx, n)
                with accelerator.autocast():
                    logits, values, ptx_logits = model(packed.input_ids, packed.attention_mask, packed.position_ids,
                                                       ptx_ids, logits_index=packed.index)
                values = packed.unpack(values)
            else:
                with accelerator.autocast():
                    logits, values, ptx_logits = model(ids, att, pos, ptx_ids, logits_to_keep=n + 1)
                logits, values = logits[:, :-1], values[:, ctx - 1 : -1]
            logits = logits.float()
            if p.temperature != 1.0:  # dividing by 1 is exact: skip the copy of the logits
                logits = logits / p.temperature
            logprobs, entropy = rlhf.logprobs_and_entropy(logits, ids[:, ctx:])
            mask = mb["mask"][:, :n]
            # Token means over the whole minibatch of all processes: gradients averaged over N processes
            # are then those of one process on the combined minibatch.
            num_tokens = _global_token_count(accelerator, mask)
            pg_loss, pg_stats = rlhf.policy_loss(logprobs, mb["logprobs"][:, :n], advantages[idx, :n], mask,
                                                 p.clip_range, num_tokens=num_tokens,
                                                 log_ratio_clamp=p.log_ratio_clamp)
            vf_loss, vf_clip = rlhf.value_loss(values, mb["values"][:, :n], returns[idx, :n], mask,
                                               p.clip_range_value, num_tokens=num_tokens)
            ptx = rlhf.lm_loss(ptx_logits.float(), ptx_ids) if ptx_logits is not None else None
            loss = rlhf.ppo_ptx_loss(pg_loss, vf_loss, ptx, p.vf_coef, p.ptx_coef)
            if guard is not None and not guard.check(
                {"policy loss": pg_loss, "value loss": vf_loss, "ptx loss": ptx}, iteration + 1, "minibatch"
            ):
                continue
            accelerator.backward(loss)  # under DeepSpeed the engine also clips and steps here
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), p.max_grad_norm)
            # Under DeepSpeed the norm is None (the engine already stepped): only the losses are checked there.
            if guard is not None and not guard.check({"gradient norm": grad_norm}, iteration + 1, "minibatch"):
                optimizer.zero_grad()
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            with torch.no_grad():
                stats = {
                    "ppo/policy_loss": pg_loss,
                    "ppo/value_loss": vf_loss,
                    "ppo/loss": loss,
                    "ppo/clip_frac": pg_stats["clip_frac"],
                    "ppo/approx_kl": pg_stats["approx_kl"],
                    "ppo/value_clip_frac": vf_clip,
                    "ppo/entropy": rlhf.masked_mean(entropy, mask),
                    "ppo/grad_norm": torch.as_tensor(float("nan") if grad_norm is None else grad_norm),
                }
                if ptx is not None:
                    stats["ppo/ptx_loss"] = ptx
                # Summed on the device in float64 (as Python floats would be): one host transfer per iteration.
                for k, v in stats.items():
                    v = v.detach().to(device=loss.device, dtype=torch.float64)
                    sums[k] = sums[k] + v if k in sums else v
            steps += 1
    keys = sorted(sums)
    local = dict(zip(keys, (torch.stack([sums[k] for k in keys]) / steps).tolist(), strict=True)) if sums else {}
    return mean_over_processes(accelerator, local)


def _minibatches(p: PPOConfig, seed: int, iteration: int, accelerator: Accelerator) -> list[list[torch.Tensor]]:
    """For each PPO epoch, this process's minibatches as index tensors into its rollout.

    Each generation chunk (`generation_batch_size` samples, one seed per place in the global batch) is
    shuffled with its own generator, and minibatch j takes the j-th slice of every local chunk. A global
    minibatch is then the j-th slice of every chunk of the global batch, whichever process holds it: one
    process with N times the batch takes the same optimizer steps as N processes.
    """
    chunk = p.generation_batch_size or p.rollout_batch_size
    n_chunks = p.rollout_batch_size // chunk
    per_chunk = p.minibatch_size // n_chunks
    first = accelerator.process_index * n_chunks
    gens = [torch.Generator().manual_seed(seed * 7919 + iteration + 1_000_003 * (first + c)) for c in range(n_chunks)]
    epochs = []
    for _ in range(p.ppo_epochs):
        orders = [c * chunk + torch.randperm(chunk, generator=gens[c]) for c in range(n_chunks)]
        epochs.append([torch.cat([o[j : j + per_chunk] for o in orders]) for j in range(0, chunk, per_chunk)])
    return epochs


def _global_token_count(accelerator: Accelerator, mask: torch.Tensor) -> torch.Tensor:
    """The minibatch's real tokens over all processes, divided by their number (see `rlhf.policy_loss`)."""
    count = mask.sum().detach()
    if accelerator.num_processes == 1:
        return count.clamp(min=1)
    return (accelerator.reduce(count, reduction="sum") / accelerator.num_processes).clamp(min=1)


def _ptx_batch(blocks: torch.Tensor, step: int, batch_size: int, seed: int, accelerator: Accelerator) -> torch.Tensor:
    """The corpus blocks of optimizer step `step` on this process: a fixed shuffled order, cycled, so a
    resumed run continues with the same blocks it would have seen."""
    per_step = batch_size * accelerator.num_processes
    start = step * per_step + accelerator.process_index * batch_size
    epoch, offset = divmod(start, len(blocks))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + epoch))
    idx = torch.cat([order, torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + epoch + 1))])
    return blocks[idx[offset : offset + batch_size]].to(accelerator.device)


# ------------------------------------------------------------------------------------------------- statistics


def global_moments(accelerator: Accelerator, values: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked mean and (Bessel-corrected) variance over every process's batch."""
    if accelerator.num_processes == 1:
        return {"mean": rlhf.masked_mean(values, mask), "var": rlhf.masked_var(values, mask)}
    sums = torch.stack([(values * mask).sum(), mask.sum()])
    sums = accelerator.reduce(sums, reduction="sum")
    mean = sums[0] / sums[1]
    sq = accelerator.reduce((((values - mean) ** 2) * mask).sum(), reduction="sum")
    return {"mean": mean, "var": sq / (sums[1] - 1).clamp(min=1)}


def mean_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over processes (equal batch sizes per process, so a mean of means is fair)."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], device=accelerator.device, dtype=torch.float64)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist(), strict=True))


def rollout_metrics(
    accelerator: Accelerator, r: Rollout, kl: torch.Tensor, rewards: torch.Tensor, returns: torch.Tensor,
    beta: float,
) -> dict[str, float]:
    """Per-iteration statistics of the sampled batch; KL is per completion (summed over its tokens).

    `kl` is the masked per-token k1 that went into the rewards, so `ppo/kl` is the number β multiplied.
    """
    k3 = rlhf.kl_estimates(r.logprobs, r.ref_logprobs)[1]
    kl_seq = kl.sum(1)
    m = {
        "ppo/score": r.scores.mean(),
        "ppo/kl": kl_seq.mean(),
        "ppo/kl_k3": (k3 * r.mask).sum(1).mean(),
        "ppo/kl_penalty": beta * kl_seq.mean(),
        "ppo/reward": (rewards * r.mask).sum(1).mean(),
        "ppo/beta": torch.tensor(beta),
        "ppo/completion_length": r.mask.sum(1).mean(),
        "ppo/eos_rate": r.ended.float().mean(),
        "ppo/value_mean": rlhf.masked_mean(r.values, r.mask),
        "ppo/explained_var": rlhf.explained_variance(r.values, returns, r.mask),
    }
    if r.gold is not None:
        m["ppo/gold_score"] = torch.tensor(sum(r.gold) / len(r.gold))
    return mean_over_processes(accelerator, {k: float(v) for k, v in m.items()})
