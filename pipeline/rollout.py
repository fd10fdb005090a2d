"""PPO's machinery: the trained policy-and-value module, rollouts (sample, then score without gradients) and the
held-out evaluation of a policy. The PPO stage (pipeline/stages/ppo.py) reads as the algorithm on top of this.

Everything here is written for N processes under DDP or DeepSpeed ZeRO: sampling seeds belong to places in
the global batch, the policy's ZeRO-3 shards are gathered once per rollout (`distributed.gathered_for_generation`),
and every rank makes the same number of forwards and `generate` calls (under ZeRO-3 each is a collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline import distributed, rlhf
from pipeline.config import PPOConfig
from pipeline.modeling import token_scores


class PolicyAndValue(torch.nn.Module):
    """The two trained models behind one forward, so one `accelerator.prepare` wraps both (DDP, FSDP, ZeRO)
    and one backward syncs all gradients; the ptx batch goes through the same forward for the same reason."""

    def __init__(self, policy: PreTrainedModel, value_model: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        ptx_input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        values = token_scores(self.value_model, input_ids, attention_mask, position_ids)
        ptx_logits = None
        if ptx_input_ids is not None:
            ptx_logits = self.policy(input_ids=ptx_input_ids, use_cache=False).logits
        return logits, values, ptx_logits

    # What TRL's `unwrap_model_for_generation` asks of the module it unwraps.
    @property
    def is_gradient_checkpointing(self) -> bool:
        if hasattr(self.policy, "is_activation_checkpointing"):  # transformers 5's name for it
            return bool(self.policy.is_activation_checkpointing)
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()


@dataclass
class Models:
    """What a rollout needs: the prepared policy-and-value module, the frozen reference and reward model."""

    accelerator: Accelerator
    model: torch.nn.Module  # PolicyAndValue, as returned by accelerator.prepare
    ref_policy: torch.nn.Module  # frozen; a DeepSpeed inference engine under DeepSpeed
    reward_model: torch.nn.Module  # frozen; idem
    tokenizer: PreTrainedTokenizerBase
    gather_for_generation: bool = True


@dataclass
class Rollout:
    """One batch of sampled episodes: [B, P + R] sequences, [B, R] per-completion-token tensors, [B] scores."""

    query_responses: torch.Tensor  # left-padded prompt (P tokens) + sampled completion (R tokens)
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    context_length: int  # P
    mask: torch.Tensor  # [B, R] 1 up to and including EOS
    ended: torch.Tensor  # [B] bool: the completion emitted EOS
    logprobs: torch.Tensor  # [B, R] under the policy at sampling time
    ref_logprobs: torch.Tensor  # [B, R] under the frozen reference
    values: torch.Tensor  # [B, R] value of the state before each completion token
    scores: torch.Tensor  # [B] reward-model score (missing-EOS penalty not applied)
    prompts: list[str]  # plain prompt text (what the gold reward reads)
    completions: list[str]
    gold: list[float] | None

    @property
    def responses(self) -> torch.Tensor:
        return self.query_responses[:, self.context_length :]

    def index(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k)[idx] for k in ("query_responses", "attention_mask", "position_ids", "mask",
                                                   "logprobs", "values")}


# ------------------------------------------------------------------------------------------------- rollout


def sample_batch(models: Models, prompts: list[tuple[str, str]], p: PPOConfig, gold: Any, seed: int,
                 iteration: int) -> Rollout:
    """This process's rollout of iteration `iteration`, sampled in chunks of `generation_batch_size` prompts.

    Each chunk's seed is fixed by its place in the iteration's global batch, not by the process that
    samples it: N processes draw the same completions as one process with N times the batch.
    """
    accelerator = models.accelerator
    chunk = p.generation_batch_size or p.rollout_batch_size
    chunks_per_process = p.rollout_batch_size // chunk
    first = accelerator.process_index * chunks_per_process
    global_chunks = chunks_per_process * accelerator.num_processes
    seeds = [seed * 1_000_003 + iteration * global_chunks + first + k for k in range(chunks_per_process)]
    return generate_rollout(models, prompts, p, gold, seeds, chunk_size=chunk)


@torch.no_grad()
def generate_rollout(
    models: Models,
    prompts: list[tuple[str, str]],
    p: PPOConfig,
    gold: Any,
    seed: int | list[int],
    chunk_size: int | None = None,
    with_values: bool = True,
) -> Rollout:
    """Sample one completion of each (model text, plain text) prompt and score it, all without gradients.

    Sampling runs in eval mode with the KV cache, `chunk_size` prompts per `generate` (all at once by
    default), chunk k seeded with `seed[k]`; the policy's ZeRO-3 shards are gathered once for all chunks
    unless `ppo.gather_for_generation` is off. The log-probs are then recomputed by a plain forward (the
    numbers PPO's ratio compares against), at the sampling temperature.
    """
    accelerator, tokenizer = models.accelerator, models.tokenizer
    ref_policy, reward_model = models.ref_policy, distributed.inner(models.reward_model)
    unwrapped = accelerator.unwrap_model(models.model)
    device = accelerator.device
    chunk_size = chunk_size or len(prompts)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) != -(-len(prompts) // chunk_size):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts in chunks of {chunk_size}")
    was_training = unwrapped.training
    pieces = []
    with distributed.gathered_for_generation(models.model, accelerator, models.gather_for_generation) as gathered:
        gathered.eval()
        for k, start in enumerate(range(0, len(prompts), chunk_size)):
            enc = encode_prompts(tokenizer, [t for t, _ in prompts[start : start + chunk_size]],
                                 p.max_prompt_length, device)
            torch.manual_seed(seeds[k])  # the sampling noise of this chunk, whatever ran before (resume is exact)
            sequences = gathered.policy.generate(
                **enc, do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                max_new_tokens=p.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            pieces.append((enc["input_ids"], enc["attention_mask"], sequences[:, enc["input_ids"].shape[1] :]))
    policy = unwrapped.policy
    # One left-padded prompt width P for the batch; every completion has R = max_new_tokens columns, so
    # chunks concatenate and N processes gather equal shapes.
    context = max(q.shape[1] for q, _, _ in pieces)
    queries, query_masks, all_responses = [], [], []
    for q, qm, resp in pieces:
        queries.append(_left_pad(q, context, tokenizer.pad_token_id))
        query_masks.append(_left_pad(qm, context, 0))
        if resp.shape[1] < p.max_new_tokens:
            resp = torch.cat([resp, resp.new_full((len(resp), p.max_new_tokens - resp.shape[1]),
                                                  tokenizer.pad_token_id)], dim=1)
        all_responses.append(resp)
    responses = torch.cat(all_responses)
    mask, ended = rlhf.completion_mask(responses, tokenizer.eos_token_id)
    query_responses = torch.cat([torch.cat(queries), responses], dim=1)
    attention_mask = torch.cat([torch.cat(query_masks), mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    logprobs, ref_logprobs, values, scores = [], [], [], []
    last = context + rlhf.last_token_index(mask)
    for i in range(0, len(prompts), p.minibatch_size):  # forwards in minibatch-size chunks bound the memory
        sl = slice(i, i + p.minibatch_size)
        ids, att, pos = query_responses[sl], attention_mask[sl], position_ids[sl]
        logits = policy(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
        logprobs.append(response_logprobs(logits, ids, context, p.temperature))
        ref_logits = ref_policy(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
        ref_logprobs.append(response_logprobs(ref_logits, ids, context, p.temperature))
        if with_values:
            values.append(token_scores(unwrapped.value_model, ids, att, pos)[:, context - 1 : -1])
        rm = token_scores(reward_model, ids, att, pos)
        scores.append(rm[torch.arange(len(ids), device=device), last[sl]])
    unwrapped.train(was_training)

    completions = []
    for row, m in zip(responses, mask, strict=True):
        completions.append(tokenizer.decode(row[: int(m.sum())], skip_special_tokens=True))
    plain = [q for _, q in prompts]
    logprobs_t = torch.cat(logprobs) * mask
    golds = [gold(q, c, bool(e)) for q, c, e in zip(plain, completions, ended, strict=True)] if gold else None
    scores_t = torch.cat(scores)
    if p.reward == "gold":  # the oracle run: the gold reward replaces the reward model's score
        scores_t = torch.tensor(golds, dtype=scores_t.dtype, device=scores_t.device)
    return Rollout(
        query_responses=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids,
        context_length=context,
        mask=mask,
        ended=ended,
        logprobs=logprobs_t,
        ref_logprobs=torch.cat(ref_logprobs) * mask,
        values=torch.cat(values) * mask if with_values else torch.zeros_like(logprobs_t),
        scores=scores_t,
        prompts=plain,
        completions=completions,
        gold=golds,
    )


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Prompts as `generate` receives them: left-padded, and left-truncated to `max_length` tokens."""
    old_side, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"  # generation appends on the right
    tokenizer.truncation_side = "left"  # an over-long prompt keeps its end, next to the completion
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                         add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_side, old_trunc


def _left_pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t.new_full((len(t), width - t.shape[1]), value), t], dim=1)


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor, context: int, temperature: float) -> torch.Tensor:
    """Log-probs of the completion tokens: position t of the sequence predicts token t + 1."""
    return rlhf.logprobs_from_logits(logits[:, context - 1 : -1] / temperature, ids[:, context:])


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(
    models: Models,
    prompts: list[tuple[str, str]],
    corpus_blocks: torch.Tensor | None,
    p: PPOConfig,
    gold: Any,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out metrics of the current policy: sampled completions (temperature 1) scored by the reward model
    and the gold reward, their KL to the SFT reference, and the LM loss on held-out corpus blocks.

    The prompts are cut into chunks of `eval_batch_size`, each with its own seed, and the chunks split over
    processes (every process runs as many as the busiest, repeating one and dropping its results: under
    ZeRO-3 a forward is a collective); the records are gathered, so the numbers are global and the same
    for any number of processes. The same seeds at every evaluation: the SFT-vs-PPO difference is the
    policy's, not the sampling noise's.
    """
    accelerator = models.accelerator
    records: list[dict[str, Any]] = []
    starts = list(range(0, len(prompts), p.eval_batch_size))
    mine, real = distributed.even_split(len(starts), accelerator)
    for j, c in enumerate(mine):
        chunk = prompts[starts[c] : starts[c] + p.eval_batch_size]
        r = generate_rollout(models, chunk, p, gold, seed=seed + starts[c], with_values=False)
        if j >= real:
            continue
        kl = ((r.logprobs - r.ref_logprobs) * r.mask).sum(1)
        for b in range(len(chunk)):
            records.append({
                "prompt": r.prompts[b], "completion": r.completions[b], "score": float(r.scores[b]),
                "gold": r.gold[b] if r.gold is not None else None, "kl": float(kl[b]),
                "ended": bool(r.ended[b]), "num_tokens": int(r.mask[b].sum()),
            })
    if accelerator.num_processes > 1:
        records = gather_object(records)
    n = len(records)
    metrics = {
        "eval/score": sum(r["score"] for r in records) / n,
        "eval/kl": sum(r["kl"] for r in records) / n,
        "eval/eos_rate": sum(r["ended"] for r in records) / n,
        "eval/completion_length": sum(r["num_tokens"] for r in records) / n,
    }
    if gold is not None:
        metrics["eval/gold_score"] = sum(r["gold"] for r in records) / n
        metrics["eval/perfect_rate"] = sum(math.isclose(r["gold"], 1.0) for r in records) / n
    if corpus_blocks is not None and len(corpus_blocks):
        metrics["eval/corpus_loss"] = corpus_loss(accelerator, models.model, corpus_blocks, p.ptx_batch_size)
    return metrics, records


@torch.no_grad()
def corpus_loss(accelerator: Accelerator, model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean LM loss of the policy on held-out corpus blocks (what the ptx term protects), over all processes."""
    policy = accelerator.unwrap_model(model).policy
    was_training = policy.training
    policy.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    mine, real = distributed.even_split(len(blocks), accelerator)  # equal forwards on every rank (ZeRO-3)
    for i in range(0, len(mine), batch_size):
        ids = blocks[mine[i : i + batch_size]].to(accelerator.device)
        logits = policy(input_ids=ids, use_cache=False).logits
        n = min(len(ids), max(real - i, 0))  # rows past `real` repeat a block: dropped
        if n:
            total += rlhf.lm_loss(logits[:n], ids[:n]) * n
            count += n
    policy.train(was_training)
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count)
