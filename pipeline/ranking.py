"""The reward model's machinery: rankings as model inputs, their collation, scoring and metrics.

A ranking is one prompt with its K completions, each tokenized as prompt + completion + EOS (the reward is read
at the EOS), and the pairs its ranks imply. The rm stage trains on batches of them (one prompt's comparisons in
one batch element, InstructGPT); the rm stage, the dry run, the label stage and the benchmark share the encoding,
the scoring across processes and the held-out metrics below, so they all see the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pipeline import rlhf
from pipeline.config import ConfigError
from pipeline.data import ranking_pairs
from pipeline.evaluation import chat_prompt, render_prompt
from pipeline.modeling import compute_rewards

log = logging.getLogger(__name__)


@dataclass
class Ranking:
    """One prompt's completions, tokenized (prompt + completion + EOS each), and the pairs its ranks give."""

    prompt: str
    completions: list[str]
    ranks: list[int]
    input_ids: list[list[int]]
    pairs: list[tuple[int, int]]
    truncated: int = 0  # completions cut to fit max_length (the dry run reports the count)
    weight: float = 1.0  # the prompt's weight in the loss's mean over prompts (rm.extra_weight)


def fit(prompt: list[int], completion: list[int], eos: int, max_length: int) -> tuple[list[int], bool]:
    """prompt + completion + EOS in at most `max_length` tokens: the prompt's start goes first, then the
    completion's end; the EOS always stays, since the reward is read there. Returns (ids, truncated)."""
    kept_completion = completion[: max_length - 1]
    room = max_length - 1 - len(kept_completion)
    # max(0, ...): a negative start would slice from the end and cut a prompt that fits
    kept_prompt = prompt[max(0, len(prompt) - room) :] if room > 0 else []
    truncated = len(kept_prompt) < len(prompt) or len(kept_completion) < len(completion)
    return kept_prompt + kept_completion + [eos], truncated


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_rankings(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, key: str, chat: bool = False
) -> list[Ranking]:
    """Tokenize normalized ranking rows (`prompt`, `completions`, `ranks`) into per-prompt examples.

    Prompt and completion are tokenized separately and concatenated, as a policy's sampled tokens follow
    its prompt's tokens in PPO; the reward model then scores exactly the ids it will see there. With `chat`
    (config `chat_prompts`) the prompt is one user turn rendered by the chat template with the assistant's
    header, as PPO renders its prompts for a chat model (`evaluation.chat_prompt`; a prompt the label stage
    already rendered stays as it is); `Ranking.prompt` stays the text of the row. A `weight` column
    (rm.extra_weight) sets each prompt's weight in the loss; 1 without one.
    """
    prompts = list(rows["prompt"])
    completions = list(rows["completions"])
    ranks = list(rows["ranks"])
    weights = list(rows["weight"]) if "weight" in rows.column_names else [1.0] * len(prompts)
    texts = [chat_prompt(p, tokenizer) for p in prompts] if chat else prompts
    prompt_ids = tokenize(texts, tokenizer)
    flat = tokenize([c for cs in completions for c in cs], tokenizer)
    out: list[Ranking] = []
    truncated = 0
    pos = 0
    for i, (prompt, cs, rk) in enumerate(zip(prompts, completions, ranks, strict=True)):
        pairs = ranking_pairs(rk)
        if not pairs:  # data.py rejects these; kept as a guard because the loss would divide by zero
            raise ConfigError(f"'{key}', row {i + 1}: all completions are tied; no comparison to learn from")
        ids = []
        cut_here = 0
        for c in flat[pos : pos + len(cs)]:
            seq, cut = fit(prompt_ids[i], c, tokenizer.eos_token_id, max_length)
            cut_here += cut
            ids.append(seq)
        pos += len(cs)
        truncated += cut_here
        out.append(Ranking(prompt=prompt, completions=list(cs), ranks=list(rk), input_ids=ids, pairs=pairs,
                           truncated=cut_here, weight=float(weights[i])))
    if truncated:
        log.warning("rm: %d of %d completions in '%s' exceed rm.max_length=%d tokens and were truncated "
                    "(prompt start first)", truncated, pos, key, max_length)
    return out


def encode_demonstrations(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[Ranking]:
    """Demonstrations as one-completion "rankings" (no pairs), for scoring only."""
    out = []
    for row in rows:
        prompt, _ = render_prompt(row, tokenizer)
        completion = row["messages"][-1]["content"] if row.get("messages") else row["completion"]
        p, c = tokenize([prompt, completion], tokenizer)
        ids, cut = fit(p, c, tokenizer.eos_token_id, max_length)
        out.append(Ranking(prompt=prompt, completions=[completion], ranks=[1], input_ids=[ids], pairs=[],
                           truncated=int(cut)))
    return out


class RankingCollator:
    """Flatten whole prompts into one padded batch of completions, with the pairs as index rows.

    Output: `input_ids`/`attention_mask` [N, L] right-padded (N = Σ K over the batch's prompts),
    `completion_group` [N] and `ranks` [N], `pairs` [P, 2] indices into the N completions, `pair_group` [P],
    and `group_weight` [G] when some prompt weighs other than 1.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[Ranking]) -> dict[str, torch.Tensor]:
        seqs: list[list[int]] = []
        group: list[int] = []
        ranks: list[int] = []
        pairs: list[tuple[int, int]] = []
        pair_group: list[int] = []
        for g, ex in enumerate(examples):
            base = len(seqs)
            seqs.extend(ex.input_ids)
            group.extend([g] * len(ex.input_ids))
            ranks.extend(ex.ranks)
            pairs.extend((base + w, base + lo) for w, lo in ex.pairs)
            pair_group.extend([g] * len(ex.pairs))
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_group": torch.tensor(group),
            "ranks": torch.tensor(ranks),
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
            "pair_group": torch.tensor(pair_group, dtype=torch.long),
        }
        if any(ex.weight != 1.0 for ex in examples):
            batch["group_weight"] = torch.tensor([ex.weight for ex in examples], dtype=torch.float32)
        return batch


@torch.no_grad()
def score_rankings(
    model: torch.nn.Module,
    rankings: Sequence[Ranking],
    pad_token_id: int,
    batch_size: int,
    accelerator: Accelerator | PartialState,
) -> list[list[float]]:
    """The reward of every completion of every ranking, computed across processes; the same on all of them.

    Every process runs the same number of forward passes (the shorter shards repeat an example and drop
    its result), because under FSDP or ZeRO-3 a forward pass is a collective operation.
    """
    if not rankings:
        return []
    n, world, rank = len(rankings), accelerator.num_processes, accelerator.process_index
    per_process = math.ceil(n / world)
    mine = list(range(rank * per_process, min(n, (rank + 1) * per_process)))
    padded = mine + [mine[-1] if mine else 0] * (per_process - len(mine))
    collate = RankingCollator(pad_token_id)
    was_training = model.training
    model.eval()
    results: list[tuple[int, list[float]]] = []
    try:
        starts = range(0, len(padded), batch_size)
        for start in tqdm(starts, desc="Scoring rankings", disable=not accelerator.is_main_process or len(starts) < 4):
            idx = padded[start : start + batch_size]
            batch = collate([rankings[i] for i in idx])
            rewards = compute_rewards(model, batch["input_ids"].to(accelerator.device),
                                      batch["attention_mask"].to(accelerator.device)).float().cpu()
            offset = 0
            for j, i in enumerate(idx):
                k = len(rankings[i].input_ids)
                if start + j < len(mine):
                    results.append((i, rewards[offset : offset + k].tolist()))
                offset += k
    finally:
        model.train(was_training)
    if world > 1:
        results = gather_object(results)
    by_index = dict(results)
    return [by_index[i] for i in range(n)]


def ranking_metrics(
    rewards: Sequence[Sequence[float]], ranks: Sequence[Sequence[int]], golds: Sequence[Sequence[float]] | None = None
) -> dict[str, float]:
    """Held-out metrics of a reward model from its rewards on ranked completions.

    - `loss`: the ranking loss (no margin or centering), prompts weighted equally;
    - `pairwise_acc`: share of all held-out comparisons the RM orders as the labels do (ties count ½);
    - `rank1_acc`: share of prompts whose highest-reward completion has rank 1, against `rank1_chance`,
      the expected share when picking a completion at random (1/K without ties);
    - `gold_agreement`: share of completion pairs with different gold scores that the RM orders like the
      gold reward (only with a gold reward), pooled over all pairs;
    - `gold_agreement_per_prompt`: the same share within each prompt, averaged over prompts, so that a prompt
      with many completions (n completions make up to n(n-1)/2 pairs) weighs what any other prompt weighs;
    - `reward_mean`, `reward_std` over all completions.
    """
    losses, correct, pairs_total, rank1, chance = [], 0.0, 0, 0, 0.0
    agree, agree_total = 0.0, 0
    per_prompt: list[float] = []
    flat: list[float] = []
    for i, (rw, rk) in enumerate(zip(rewards, ranks, strict=True)):
        r = torch.tensor(rw, dtype=torch.float64)
        pairs = torch.tensor(ranking_pairs(list(rk)), dtype=torch.long).reshape(-1, 2)
        flat.extend(rw)
        if len(pairs):
            group = torch.zeros(len(pairs), dtype=torch.long)
            losses.append(float(rlhf.ranking_loss(r, pairs, group, 1)))
            correct += float(rlhf.pairwise_correct(r, pairs).sum())
            pairs_total += len(pairs)
        best = min(rk)
        rank1 += int(rk[int(r.argmax())] == best)
        chance += sum(x == best for x in rk) / len(rk)
        if golds is not None:
            g = golds[i]
            gold_pairs = [(a, b) for a in range(len(g)) for b in range(len(g)) if g[a] > g[b]]
            if gold_pairs:
                agreed = float(rlhf.pairwise_correct(r, torch.tensor(gold_pairs)).sum())
                agree += agreed
                agree_total += len(gold_pairs)
                per_prompt.append(agreed / len(gold_pairs))
    flat_t = torch.tensor(flat, dtype=torch.float64)
    metrics = {
        "loss": sum(losses) / max(len(losses), 1),
        "pairwise_acc": correct / max(pairs_total, 1),
        "rank1_acc": rank1 / len(rewards),
        "rank1_chance": chance / len(rewards),
        "reward_mean": float(flat_t.mean()),
        "reward_std": float(flat_t.std()) if len(flat) > 1 else 0.0,
    }
    if golds is not None and agree_total:
        metrics["gold_agreement"] = agree / agree_total
        metrics["gold_agreement_per_prompt"] = sum(per_prompt) / len(per_prompt)
    return metrics


def samples_agreement(
    score: Callable[[list[Ranking]], list[list[float]]], tokenizer: PreTrainedTokenizerBase, policy_dir: Path,
    max_length: int,
) -> tuple[float, float] | None:
    """Gold agreement on what a policy actually produces, (per prompt, pooled): a policy stage's held-out
    samples (samples.jsonl, with their gold scores), each prompt's samples ranked by `score` (a reward model's
    rewards).

    Per prompt is the headline: a held-out file repeats the prompts of a small prompt space (the tiny task's 10
    count prompts fill 29 % of its rows), so one prompt can hold 56 of 384 samples and, its pairs growing with
    the square, half of all pooled pairs; per prompt, every distinct prompt weighs the same, as in the reward
    model's own loss. Both numbers are reported.

    The held-out rankings were written by hand (or by the tiny task's generator); PPO optimizes against
    the RM on the policy's own samples, where it matters most that the RM orders them like the gold: the
    SFT policy's before PPO, and in a later RLHF round the last PPO policy's, which drifted away from both.
    None when the samples have no gold scores or are chat-templated.
    """
    path = policy_dir / "samples.jsonl"
    if not path.is_file():
        return None
    if json.loads((path.parent / "summary.json").read_text()).get("conversational"):
        return None  # samples.jsonl keeps the plain user turn, not the chat-templated text the RM scores
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("gold") is None:
            return None
        by_prompt[row["prompt"]].append(row)
    rankings, golds = [], []
    for prompt, rows in by_prompt.items():
        p = tokenize([prompt], tokenizer)[0]
        ids = []
        for row in rows:
            c = tokenize([row["completion"]], tokenizer)[0]
            # An unfinished sample is scored as PPO will score it: without an EOS.
            seq, _ = fit(p, c, tokenizer.eos_token_id, max_length)
            ids.append(seq if row["ended"] else seq[:-1])
        rankings.append(Ranking(prompt, [x["completion"] for x in rows], [1] * len(rows), ids, []))
        golds.append([x["gold"] for x in rows])
    if not rankings:  # e.g. sft.generation.num_prompts=0: no samples to judge
        return None
    metrics = ranking_metrics(score(rankings), [x.ranks for x in rankings], golds)
    if "gold_agreement" not in metrics:  # every prompt's samples tied on gold
        return None
    return metrics["gold_agreement_per_prompt"], metrics["gold_agreement"]
