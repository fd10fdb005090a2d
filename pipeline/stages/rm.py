"""Stage 3, rm: a reward model trained on ranked completions, all comparisons of a prompt in one batch element.

setup → train → save:
  1. validate the rankings (train and held-out) and the demonstrations used to normalize the reward;
  2. load the starting model (this profile's SFT output unless `rm.init` names another) with a fresh scalar
     head, scoring prompt + completion + EOS at its last non-padding token (the EOS);
  3. tokenize each ranking once: a training example is one prompt with its K completions and the pairs
     its ranks imply (ties give no pair), so every completion is forwarded once per step however many
     comparisons it takes part in (K = 4: 4 forwards for 6 comparisons, against 12 with pairs);
  4. measure the untrained head on the held-out rankings, then train with the transformers Trainer and
     InstructGPT's loss (`pipeline.rlhf.ranking_loss`: mean over a prompt's pairs, prompts weighted equally);
  5. normalize (InstructGPT): shift the reward so that held-out demonstrations average 0;
  6. measure on the held-out rankings (pairwise accuracy, rank-1 accuracy, agreement with the gold reward)
     and write the Hugging Face directory (`AutoModelForSequenceClassification`, num_labels = 1) atomically.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers import set_seed as hf_set_seed
from trl.trainer.utils import disable_dropout_in_model

from pipeline import rlhf, tracking
from pipeline.checkpoint import StageOutput, build_summary
from pipeline.config import Config, ConfigError, RMConfig, stage_key, to_dict
from pipeline.data import load_demonstrations, load_rankings, ranking_pairs
from pipeline.evaluation import GoldFn, check_gold_covers, gold_function, render_prompt
from pipeline.modeling import compute_rewards, context_length, load_reward_model, shift_reward
from pipeline.training import check_launch, final_metrics, save_stage_output, trainer_kwargs

log = logging.getLogger(__name__)
STAGE = "rm"
SCORE_COLUMNS = ("prompt", "completion", "rank", "reward", "gold")  # the eval/rm_scores table


@dataclass
class Ranking:
    """One prompt's completions, tokenized (prompt + completion + EOS each), and the pairs its ranks give."""

    prompt: str
    completions: list[str]
    ranks: list[int]
    input_ids: list[list[int]]
    pairs: list[tuple[int, int]]
    truncated: int = 0  # completions cut to fit max_length (the dry run reports the count)


@tracking.tracked(STAGE)
def run(cfg: Config, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    started = time.time()
    r = cfg.rm
    hf_set_seed(cfg.seed)

    # 1. Data first: a malformed row fails here, before a model is loaded or a directory written.
    train_rows, eval_rows, demo_source, demos = load_data(cfg)
    if r.policy_samples and not (Path(r.policy_samples) / "samples.jsonl").is_file():
        raise ConfigError(f"rm.policy_samples: {r.policy_samples} has no samples.jsonl (a finished sft or ppo "
                          "stage directory has one)")

    # 2. Starting model: the SFT causal LM; transformers swaps its LM head for a fresh scalar head.
    init = r.init or str(cfg.stage_dir("sft"))
    model, tokenizer = load_reward_model(init, make_target=f"sft PROFILE={cfg.profile}" if not r.init else None)
    if r.disable_dropout:
        disable_dropout_in_model(model)
    max_pos = context_length(model)
    if max_pos and r.max_length > max_pos:
        raise ConfigError(f"'rm.max_length' ({r.max_length}) exceeds the model's context ({max_pos})")
    gold = gold_function(cfg.gold_reward)
    if eval_rows is not None:
        check_gold_covers(gold, [{"prompt": p} for p in eval_rows["prompt"]], tokenizer, "rm.data.eval")

    # 3. Tokenize once.
    train = encode_rankings(train_rows, tokenizer, r.max_length, "rm.data.train")
    held_out = encode_rankings(eval_rows, tokenizer, r.max_length, "rm.data.eval") if eval_rows else []
    log.info("rm: %d training prompts (%d comparisons), %d held-out prompts", len(train),
             sum(len(x.pairs) for x in train), len(held_out))

    out = StageOutput(cfg.stage_dir(STAGE), stage_key(cfg, STAGE))
    args = TrainingArguments(
        **trainer_kwargs(cfg, STAGE, out.checkpoints_dir, bool(held_out)),
        remove_unused_columns=False,  # the collator needs the ranks and pairs, not only model inputs
    )
    resume_from = out.prepare(is_main=args.process_index == 0)
    trainer = RankingTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out or None,  # `evaluate` below scores it; the Trainer only checks that it exists
        data_collator=RankingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[*tracking.start(cfg, STAGE, is_main=args.process_index == 0), *(callbacks or [])],
        rm=r,
        held_out=held_out,
        gold=gold,
    )
    check_launch(trainer, STAGE)

    # 4. The untrained head, measured once (a resumed run reads the numbers saved before the interruption).
    baseline = out.load_baseline()
    if baseline is None:
        baseline = {k.replace("eval_", "eval/"): v for k, v in trainer.evaluate().items()} if held_out else {}
        out.save_baseline(baseline)
    trainer.train(resume_from_checkpoint=resume_from)

    # 5. Normalize: held-out demonstrations average a reward of 0 (InstructGPT, before RL).
    metrics: dict[str, Any] = final_metrics(trainer)
    normalization: dict[str, Any] = {"data": demo_source}
    if demos is not None:
        demo_examples = encode_demonstrations(demos, tokenizer, r.max_length)
        before = _mean_reward(trainer, demo_examples)
        normalization["shift"] = before
        normalization["method"] = shift_reward(trainer.accelerator.unwrap_model(trainer.model), before)
        metrics["rm/demo_reward_mean_before_shift"] = before
        metrics["rm/demo_reward_mean"] = _mean_reward(trainer, demo_examples)
        log.info("rm: shifted rewards by %.4f (%s); held-out demonstrations now average %.2e",
                 -before, normalization["method"], metrics["rm/demo_reward_mean"])
    else:
        log.warning("rm: no demonstrations to normalize with (rm.normalize_data and sft.data.eval are null); "
                    "rewards are left unnormalized")

    # 6. Measure and save.
    table: list[dict[str, Any]] = []
    if held_out:
        # Accuracies do not move with the shift, only the reward statistics; log the final evaluation
        # unless the Trainer's own (every rm.eval_steps) already did at this step.
        evaluated = [h["step"] for h in trainer.state.log_history if "eval_pairwise_acc" in h]
        rewards = trainer.score(held_out)
        final = trainer.held_out_metrics(rewards)
        if not evaluated or evaluated[-1] != trainer.state.global_step:
            trainer.log(dict(final))
        metrics.update({k.replace("eval_", "eval/"): v for k, v in final.items()})
        table = trainer.score_table(rewards[: r.num_table_prompts])
    for name, policy_dir in (("sft", init), ("policy", r.policy_samples)):
        agreement = (samples_agreement(trainer.score, trainer.processing_class, Path(policy_dir), r.max_length)
                     if policy_dir and gold is not None else None)
        if agreement is not None:
            metrics[f"eval/gold_agreement_{name}_samples"] = agreement
    metrics.update({f"{k}_init": v for k, v in baseline.items()})
    summary = build_summary(STAGE, to_dict(cfg), metrics, started, init=init, resumed_from=resume_from,
                            normalization=normalization)
    save_stage_output(trainer, tokenizer, out, summary, {"scores.jsonl": table})
    # One table row per completion, so W&B can sort and filter by reward, rank or gold score.
    tracking.log_table("eval/rm_scores", SCORE_COLUMNS, [
        [row["prompt"], c, rank, reward, row["gold"][k] if "gold" in row else None]
        for row in table
        for k, (c, rank, reward) in enumerate(zip(row["completions"], row["ranks"], row["rewards"], strict=True))
    ])
    log.info("rm: wrote %s", out.final_dir)
    return metrics


# ------------------------------------------------------------------------------------------ data


def load_data(cfg: Config) -> tuple[datasets.Dataset, datasets.Dataset | None, str | None, datasets.Dataset | None]:
    """The validated rankings (train: rm.data.train then rm.extra_train; held-out or None) and the demonstrations the reward is normalized on
    (their source, and the rows or None): `rm.normalize_data`, else `sft.data.eval`."""
    r = cfg.rm
    train_rows = load_rankings(r.data.train, r.data.skip_invalid, cfg.datasets)
    if r.extra_train:  # e.g. each RLHF round's rankings of its policy's samples, all in one training set
        extra = [load_rankings(source, r.data.skip_invalid, cfg.datasets) for source in r.extra_train]
        train_rows = datasets.concatenate_datasets([train_rows, *extra])
    eval_rows = load_rankings(r.data.eval, r.data.skip_invalid, cfg.datasets) if r.data.eval else None
    demo_source = r.normalize_data or cfg.sft.data.eval
    demo_skip = r.data.skip_invalid if r.normalize_data else cfg.sft.data.skip_invalid
    demos = load_demonstrations(demo_source, demo_skip, cfg.datasets) if demo_source else None
    return train_rows, eval_rows, demo_source, demos


def _fit(prompt: list[int], completion: list[int], eos: int, max_length: int) -> tuple[list[int], bool]:
    """prompt + completion + EOS in at most `max_length` tokens: the prompt's start goes first, then the
    completion's end; the EOS always stays, since the reward is read there. Returns (ids, truncated)."""
    kept_completion = completion[: max_length - 1]
    room = max_length - 1 - len(kept_completion)
    # max(0, ...): a negative start would slice from the end and cut a prompt that fits
    kept_prompt = prompt[max(0, len(prompt) - room) :] if room > 0 else []
    truncated = len(kept_prompt) < len(prompt) or len(kept_completion) < len(completion)
    return kept_prompt + kept_completion + [eos], truncated


def _tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_rankings(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, key: str
) -> list[Ranking]:
    """Tokenize normalized ranking rows (`prompt`, `completions`, `ranks`) into per-prompt examples.

    Prompt and completion are tokenized separately and concatenated, as a policy's sampled tokens follow
    its prompt's tokens in PPO; the reward model then scores exactly the ids it will see there.
    """
    prompts = list(rows["prompt"])
    completions = list(rows["completions"])
    ranks = list(rows["ranks"])
    prompt_ids = _tokenize(prompts, tokenizer)
    flat = _tokenize([c for cs in completions for c in cs], tokenizer)
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
            seq, cut = _fit(prompt_ids[i], c, tokenizer.eos_token_id, max_length)
            cut_here += cut
            ids.append(seq)
        pos += len(cs)
        truncated += cut_here
        out.append(Ranking(prompt=prompt, completions=list(cs), ranks=list(rk), input_ids=ids, pairs=pairs,
                           truncated=cut_here))
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
        p, c = _tokenize([prompt, completion], tokenizer)
        ids, cut = _fit(p, c, tokenizer.eos_token_id, max_length)
        out.append(Ranking(prompt=prompt, completions=[completion], ranks=[1], input_ids=[ids], pairs=[],
                           truncated=int(cut)))
    return out


class RankingCollator:
    """Flatten whole prompts into one padded batch of completions, with the pairs as index rows.

    Output: `input_ids`/`attention_mask` [N, L] right-padded (N = Σ K over the batch's prompts),
    `completion_group` [N] and `ranks` [N], `pairs` [P, 2] indices into the N completions, `pair_group` [P].
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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_group": torch.tensor(group),
            "ranks": torch.tensor(ranks),
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
            "pair_group": torch.tensor(pair_group, dtype=torch.long),
        }


# ------------------------------------------------------------------------------------------ training


class RankingTrainer(Trainer):
    """The transformers Trainer with InstructGPT's ranking loss, and an evaluation on held-out rankings."""

    def __init__(self, *args: Any, rm: RMConfig, held_out: list[Ranking], gold: GoldFn | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rm = rm
        self.held_out = held_out
        self._golds = [[gold(x.prompt, c, True) for c in x.completions] for x in held_out] if gold else None
        self._train_stats = torch.zeros(3)  # correct pairs, pairs, Σ(r_w − r_l) since the last log

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = compute_rewards(model, inputs["input_ids"], inputs["attention_mask"])
        pairs, group = inputs["pairs"], inputs["completion_group"]
        num_groups = int(group[-1]) + 1
        margins = rlhf.rank_margins(inputs["ranks"], pairs, self.rm.margin) if self.rm.margin else None
        loss = rlhf.ranking_loss(rewards, pairs, inputs["pair_group"], num_groups, margins=margins,
                                 completion_group=group, center_coef=self.rm.center_coef)
        with torch.no_grad():
            r = rewards.detach().float()
            self._train_stats += torch.stack([
                rlhf.pairwise_correct(r, pairs).sum().cpu(),
                torch.tensor(float(len(pairs))),
                (r[pairs[:, 0]] - r[pairs[:, 1]]).sum().cpu(),
            ])
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs gain the pairwise accuracy and mean margin of the pairs seen since the last log,
        # summed over all processes (every process calls `log` at the same steps).
        if "loss" in logs and self._train_stats[1] > 0:
            stats = self.accelerator.reduce(self._train_stats.to(self.args.device), reduction="sum").cpu()
            logs["accuracy"] = float(stats[0] / stats[1])
            logs["margin"] = float(stats[2] / stats[1])
            self._train_stats.zero_()
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Held-out ranking metrics (see `ranking_metrics`), logged like the Trainer's own evaluation."""
        metrics = self.held_out_metrics(self.score(self.held_out), metric_key_prefix)
        self.log(dict(metrics))  # a copy: `log` adds the epoch to the dict it is given
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def score(self, rankings: Sequence[Ranking]) -> list[list[float]]:
        """The current model's reward of every completion of `rankings` (see `score_rankings`)."""
        return score_rankings(self.model_wrapped, rankings, self.processing_class.pad_token_id, self.rm.batch_size,
                              self.accelerator)

    def held_out_metrics(self, rewards: list[list[float]], prefix: str = "eval") -> dict[str, float]:
        """`ranking_metrics` of the held-out rankings from their `rewards`, keys prefixed `<prefix>_`."""
        metrics = ranking_metrics(rewards, [x.ranks for x in self.held_out], self._golds)
        return {f"{prefix}_{k}": v for k, v in metrics.items()}

    def score_table(self, rewards: list[list[float]]) -> list[dict[str, Any]]:
        """Prompt, completions, ranks, rewards (and gold scores) of the first held-out prompts, for inspection:
        as many as `rewards` has rows."""
        rows = []
        for i, (x, rw) in enumerate(zip(self.held_out, rewards, strict=False)):
            row: dict[str, Any] = {"prompt": x.prompt, "completions": x.completions, "ranks": x.ranks,
                                   "rewards": [round(v, 4) for v in rw]}
            if self._golds is not None:
                row["gold"] = self._golds[i]
            rows.append(row)
        return rows


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def score_rankings(
    model: torch.nn.Module,
    rankings: Sequence[Ranking],
    pad_token_id: int,
    batch_size: int,
    accelerator: Accelerator,
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
      gold reward (only with a gold reward);
    - `reward_mean`, `reward_std` over all completions.
    """
    losses, correct, pairs_total, rank1, chance = [], 0.0, 0, 0, 0.0
    agree, agree_total = 0.0, 0
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
                agree += float(rlhf.pairwise_correct(r, torch.tensor(gold_pairs)).sum())
                agree_total += len(gold_pairs)
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
    return metrics


def _mean_reward(trainer: RankingTrainer, examples: list[Ranking]) -> float:
    rewards = trainer.score(examples)
    return sum(r[0] for r in rewards) / len(rewards)


def samples_agreement(
    score: Callable[[list[Ranking]], list[list[float]]], tokenizer: PreTrainedTokenizerBase, policy_dir: Path,
    max_length: int,
) -> float | None:
    """Gold agreement on what a policy actually produces: a policy stage's held-out samples (samples.jsonl,
    with their gold scores), each prompt's samples ranked by `score` (a reward model's rewards).

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
        p = _tokenize([prompt], tokenizer)[0]
        ids = []
        for row in rows:
            c = _tokenize([row["completion"]], tokenizer)[0]
            # An unfinished sample is scored as PPO will score it: without an EOS.
            seq, _ = _fit(p, c, tokenizer.eos_token_id, max_length)
            ids.append(seq if row["ended"] else seq[:-1])
        rankings.append(Ranking(prompt, [x["completion"] for x in rows], [1] * len(rows), ids, []))
        golds.append([x["gold"] for x in rows])
    if not rankings:  # e.g. sft.generation.num_prompts=0: no samples to judge
        return None
    metrics = ranking_metrics(score(rankings), [x.ranks for x in rankings], golds)
    return metrics.get("gold_agreement")

