"""PPO's machinery: the trained policy-and-value module, rollouts (sample, then score without gradients) and the
held-out evaluation of a policy. The PPO stage (pipeline/stages/ppo.py) reads as the algorithm on top of this.

Everything here is written for N processes under DDP or DeepSpeed ZeRO: sampling seeds belong to places in
the global batch, the policy's ZeRO-3 shards are gathered once per rollout (`distributed.gathered_for_generation`),
and every rank makes the same number of forwards and `generate` calls (under ZeRO-3 each is a collective).

Forwards only compute what PPO reads (docs/performance.md): completions are cut to the batch's longest, each
block of rows to the columns it uses (`token_window`) or, with SDPA attention, packed without padding
(`pack_rows`), and causal LMs give logits at the completion positions only (`causal_lm_logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from pipeline import distributed, rlhf
from pipeline.config import PPOConfig
from pipeline.modeling import causal_lm_logits, plain_sampling, token_scores, transformers_model
from pipeline.packing import can_pack, pack_rows, token_window


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
        logits_to_keep: int = 0,
        logits_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy logits at the last `logits_to_keep` positions or at the flat positions `logits_index` (neither:
        all), values at every position, ptx logits."""
        logits = causal_lm_logits(self.policy, input_ids, attention_mask, position_ids, logits_to_keep, logits_index)
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

    query_responses: torch.Tensor  # left-padded prompt (P tokens) + completion (R = the batch's longest, with EOS)
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
    unless `ppo.gather_for_generation` is off. The policy's log-probs of the sampled tokens (the numbers PPO's
    ratio compares against, at the sampling temperature) are read from the logits `generate` computes anyway
    (`SampledLogprobs`), as TRL's PPO trainer did, with no second policy forward over the completions; or, under
    mixed precision or quantization (`logprobs_from_sampling`), recomputed by one. The reference, value and
    reward models then score the batch (`score_rollout`).
    """
    accelerator, tokenizer = models.accelerator, models.tokenizer
    unwrapped = accelerator.unwrap_model(models.model)
    device = accelerator.device
    chunk_size = chunk_size or len(prompts)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) != -(-len(prompts) // chunk_size):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts in chunks of {chunk_size}")
    was_training = unwrapped.training
    from_sampling = logprobs_from_sampling(models, p)
    pieces = []
    with distributed.gathered_for_generation(models.model, accelerator, models.gather_for_generation) as gathered:
        gathered.eval()
        for k, start in enumerate(range(0, len(prompts), chunk_size)):
            enc = encode_prompts(tokenizer, [t for t, _ in prompts[start : start + chunk_size]],
                                 p.max_prompt_length, device)
            torch.manual_seed(seeds[k])  # the sampling noise of this chunk, whatever ran before (resume is exact)
            recorder = SampledLogprobs(gathered.policy, p.temperature) if from_sampling else None
            try:
                with plain_sampling(gathered.policy):
                    sequences = gathered.policy.generate(
                        **enc, do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                        max_new_tokens=p.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id,
                        logits_processor=LogitsProcessorList([recorder] if recorder else []),
                    )
            finally:
                if recorder is not None:
                    recorder.remove()
            new_tokens = sequences[:, enc["input_ids"].shape[1] :]
            logprobs = (recorder.logprobs(new_tokens) if recorder is not None
                        else torch.zeros(new_tokens.shape, device=new_tokens.device))  # recomputed below
            pieces.append((enc["input_ids"], enc["attention_mask"], new_tokens, logprobs))
    unwrapped.train(was_training)
    query_responses, attention_mask, position_ids, context, mask, ended, logprobs = _assemble(
        pieces, tokenizer.pad_token_id, tokenizer.eos_token_id)
    responses = query_responses[:, context:]
    ref_logprobs, values, scores, recomputed = score_rollout(models, query_responses, attention_mask, position_ids,
                                                             context, mask, p, with_values, with_policy=not from_sampling)
    if recomputed is not None:
        logprobs = recomputed
    # One host transfer for the whole batch, not one per completion.
    lengths = mask.sum(1).long().tolist()
    completions = tokenizer.batch_decode([row[:n] for row, n in zip(responses.tolist(), lengths, strict=True)],
                                         skip_special_tokens=True)
    plain = [q for _, q in prompts]
    golds = ([gold(q, c, e) for q, c, e in zip(plain, completions, ended.tolist(), strict=True)]
             if gold else None)
    if p.reward == "gold":  # the oracle run: the gold reward replaces the reward model's score
        scores = torch.tensor(golds, dtype=scores.dtype, device=scores.device)
    return Rollout(
        query_responses=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids,
        context_length=context,
        mask=mask,
        ended=ended,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        prompts=plain,
        completions=completions,
        gold=golds,
    )


def _assemble(pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], pad_id: int, eos_id: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled chunks (prompt ids, prompt mask, completions, their log-probs) as one batch: (query_responses,
    attention_mask, position_ids, P, mask, ended, log-probs, 0 after each completion's end).

    Prompts are left-padded to one width P, completions right-padded to R = the longest completion of the batch
    (EOS included), not `max_new_tokens`: columns after every completion's end would only be padding that every
    forward and loss masks out. R differs between iterations and processes; nothing gathers rollout tensors.
    """
    context = max(q.shape[1] for q, _, _, _ in pieces)
    width = max(r.shape[1] for _, _, r, _ in pieces)
    queries = torch.cat([_left_pad(q, context, pad_id) for q, _, _, _ in pieces])
    query_masks = torch.cat([_left_pad(qm, context, 0) for _, qm, _, _ in pieces])
    responses = torch.cat([F.pad(r, (0, width - r.shape[1]), value=pad_id) for _, _, r, _ in pieces])
    logprobs = torch.cat([F.pad(lp, (0, width - lp.shape[1])) for _, _, _, lp in pieces])
    mask, ended = rlhf.completion_mask(responses, eos_id)
    longest = int(mask.sum(1).max())
    responses, mask, logprobs = responses[:, :longest], mask[:, :longest], logprobs[:, :longest]
    query_responses = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_masks, mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return query_responses, attention_mask, position_ids, context, mask, ended, logprobs * mask


def logprobs_from_sampling(models: Models, p: PPOConfig) -> bool:
    """Whether a rollout reads the policy's old log-probs from sampling (`ppo.logprobs_from_sampling`). null: in
    float32 only (no mixed precision, float32 weights, no quantized base), where cached decoding agrees with the
    update's full forward to rounding; under bf16 / fp16 / 4-bit it drifts further, and a second forward keeps
    PPO's first ratio at 1."""
    if p.logprobs_from_sampling is not None:
        return p.logprobs_from_sampling
    unwrapped = models.accelerator.unwrap_model(models.model)
    config = getattr(unwrapped.policy, "config", None)
    return (models.accelerator.mixed_precision == "no" and getattr(config, "quantization_config", None) is None
            and all(t.dtype == torch.float32 for t in unwrapped.parameters() if t.is_floating_point()))


class SampledLogprobs(LogitsProcessor):
    """The log-probs of the tokens `generate` samples, at the sampling temperature, read from the logits it
    computes to sample them: PPO's old log-probs without a second policy forward over the completions.

    A forward hook on the model keeps the log-softmax of each step's last-position logits (the model's own
    output, before any logits processor: top-k or top-p change what is sampled, not the policy's distribution
    PPO's ratio is about). As the last logits processor of the next step, it reads that log-softmax at the
    token sampled from it (the last column of `input_ids`); the last token's is read by `logprobs` after
    `generate` returns. One step's [B, V] is held at a time. The cached decoding differs from a full forward in
    the last bits only (float32; more under bf16)."""

    def __init__(self, policy: Any, temperature: float):
        self.temperature = temperature
        self._latest: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []
        self._handle = transformers_model(policy).register_forward_hook(self._on_forward)

    def _on_forward(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        logits = output.logits[:, -1].float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        self._latest = torch.log_softmax(logits, dim=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._steps.append(self._pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self._pending, self._latest = self._latest, None
        return scores

    def remove(self) -> None:
        self._handle.remove()

    def logprobs(self, completions: torch.Tensor) -> torch.Tensor:
        """[B, n] the log-probs of `completions` ([B, n], what `generate` returned after the prompt)."""
        n, seen = completions.shape[1], len(self._steps)
        if seen < n and self._pending is not None:  # the last sampled token (generate may run steps it undoes)
            self._steps.append(self._pending.gather(1, completions[:, seen : seen + 1]).squeeze(1))
        if len(self._steps) < n:
            raise RuntimeError(f"generate returned {n} new tokens but their logits were seen for {len(self._steps)}")
        return torch.stack(self._steps[:n], dim=1)


@torch.no_grad()
def score_rollout(
    models: Models, query_responses: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
    context: int, mask: torch.Tensor, p: PPOConfig, with_values: bool = True, with_policy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """([B, R] reference log-probs, [B, R] values, [B] reward-model scores, [B, R] policy log-probs or None) of
    sampled completions, without gradients; every [B, R] tensor is 0 after each completion's end. The policy's
    own log-probs usually come from sampling (`SampledLogprobs`); `with_policy` recomputes them here.

    Forwards run on `ppo.minibatch_size` rows at a time (bounding the memory), each on `token_window` of its
    rows only, and the causal LMs compute logits for the completion positions only (`causal_lm_logits`): the
    numbers of the real tokens are those of a forward over the whole padded batch.
    """
    unwrapped = models.accelerator.unwrap_model(models.model)
    policy, ref_policy = unwrapped.policy, models.ref_policy
    reward_model = distributed.inner(models.reward_model)
    B, R = mask.shape
    was_training = unwrapped.training
    unwrapped.eval()
    scored = (ref_policy, unwrapped.value_model, reward_model, *((policy,) if with_policy else ()))
    pack = all(can_pack(distributed.inner(m)) for m in scored)
    logprobs, ref_logprobs, values, scores = [], [], [], []
    for i in range(0, B, p.minibatch_size):
        start, end = token_window(attention_mask[i : i + p.minibatch_size], mask[i : i + p.minibatch_size], context)
        rows = slice(i, i + p.minibatch_size)
        ids, att, pos = (t[rows, start:end] for t in (query_responses, attention_mask, position_ids))
        ctx, n = context - start, end - context
        if pack:  # no padding at all: the rows' tokens side by side in fewer rows (see `pack_rows`)
            packed = pack_rows(ids, att, pos, ctx, n)
            ids_p, att_p, pos_p = packed.input_ids, packed.attention_mask, packed.position_ids
            ref_logits = causal_lm_logits(ref_policy, ids_p, att_p, pos_p, index=packed.index)
            logits = causal_lm_logits(policy, ids_p, att_p, pos_p, index=packed.index) if with_policy else None
            value = packed.unpack(token_scores(unwrapped.value_model, ids_p, att_p, pos_p)) if with_values else None
            scores.append(token_scores(reward_model, ids_p, att_p, pos_p).reshape(-1)[packed.last])
        else:
            ref_logits = causal_lm_logits(ref_policy, ids, att, pos, keep=n + 1)[:, :-1]
            logits = causal_lm_logits(policy, ids, att, pos, keep=n + 1)[:, :-1] if with_policy else None
            value = token_scores(unwrapped.value_model, ids, att, pos)[:, ctx - 1 : -1] if with_values else None
            rm = token_scores(reward_model, ids, att, pos)
            last = ctx + rlhf.last_token_index(mask[rows, :n])
            scores.append(rm[torch.arange(len(ids), device=rm.device), last])
        ref_logprobs.append(F.pad(_logprobs_at(ref_logits, ids[:, ctx:], p.temperature), (0, R - n)))
        if logits is not None:
            logprobs.append(F.pad(_logprobs_at(logits, ids[:, ctx:], p.temperature), (0, R - n)))
        if value is not None:
            values.append(F.pad(value, (0, R - n)))
    unwrapped.train(was_training)
    ref_logprobs_t = torch.cat(ref_logprobs) * mask
    values_t = torch.cat(values) * mask if with_values else torch.zeros_like(ref_logprobs_t)
    logprobs_t = torch.cat(logprobs) * mask if with_policy else None
    return ref_logprobs_t, values_t, torch.cat(scores), logprobs_t


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
    """[B, R] log-probs of the completion tokens `ids[:, context:]`: position t of the sequence predicts token
    t + 1. `logits` covers every position or only the last R + 1 (`causal_lm_logits`): the last R + 1 are read."""
    n = ids.shape[1] - context
    return _logprobs_at(logits[:, -n - 1 : -1], ids[:, context:], temperature)


def _logprobs_at(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, R] log-probs of `tokens` under `logits` [B, R, V] (each position's prediction of its token)."""
    if temperature != 1.0:  # dividing by 1 is exact: skip the copy of the logits
        logits = logits / temperature
    return rlhf.logprobs_from_logits(logits, tokens)


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
