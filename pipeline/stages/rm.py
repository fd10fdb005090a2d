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

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers import set_seed as hf_set_seed
from trl.trainer.utils import disable_dropout_in_model

from pipeline import lora, rlhf, signals, tracking
from pipeline.checkpoint import StageOutput, build_summary
from pipeline.config import Config, ConfigError, RMConfig, stage_key, to_dict
from pipeline.data import as_chat, load_demonstrations, load_rankings
from pipeline.evaluation import GoldFn, check_gold_covers, gold_function
from pipeline.guards import NonFiniteGuard
from pipeline.modeling import compute_rewards, context_length, load_reward_model, shift_reward
from pipeline.ranking import (
    Ranking,
    RankingCollator,
    encode_demonstrations,
    encode_rankings,
    ranking_metrics,
    samples_agreement,
    score_rankings,
)
from pipeline.training import check_launch, final_metrics, save_stage_output, train_or_resume, trainer_kwargs

log = logging.getLogger(__name__)
STAGE = "rm"
SCORE_COLUMNS = ("prompt", "completion", "rank", "reward", "gold")  # the eval/rm_scores table


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
    lora.check_quantization(cfg, r.lora, STAGE)
    model, tokenizer = load_reward_model(init, make_target=f"sft PROFILE={cfg.profile}" if not r.init else None,
                                         quantization=lora.quantization_config(cfg) if r.lora.enabled else None,
                                         trust_remote_code=cfg.model.trust_remote_code)
    if r.lora.enabled:  # an adapter on the frozen (QLoRA: 4-bit) model; the scalar head trains in full
        model = lora.wrap(model, r.lora, "SEQ_CLS", r.gradient_checkpointing)
    if r.disable_dropout:
        disable_dropout_in_model(model)
    max_pos = context_length(model)
    if max_pos and r.max_length > max_pos:
        raise ConfigError(f"'rm.max_length' ({r.max_length}) exceeds the model's context ({max_pos})")
    gold = gold_function(cfg.gold_reward)
    if eval_rows is not None:
        check_gold_covers(gold, [{"prompt": p} for p in eval_rows["prompt"]], tokenizer, "rm.data.eval")

    # 3. Tokenize once.
    train = encode_rankings(train_rows, tokenizer, r.max_length, "rm.data.train", cfg.chat_prompts)
    held_out = (encode_rankings(eval_rows, tokenizer, r.max_length, "rm.data.eval", cfg.chat_prompts)
                if eval_rows else [])
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
        callbacks=[*tracking.start(cfg, STAGE, is_main=args.process_index == 0), signals.StopOnSignal(STAGE),
                   *(callbacks or [])],
        rm=r,
        held_out=held_out,
        gold=gold,
    )
    check_launch(trainer, STAGE)
    trainer.configure_guard(STAGE, r.nan_policy)

    # 4. The untrained head, measured once (a resumed run reads the numbers saved before the interruption).
    baseline = out.load_baseline()
    if baseline is None:
        baseline = {k.replace("eval_", "eval/"): v for k, v in trainer.evaluate().items()} if held_out else {}
        out.save_baseline(baseline)
    # Reseeded right before training: whatever ran since the first seeding (a baseline measurement that a
    # resumed run skips) must not change the training draws. A resumed run then restores the checkpoint's RNG.
    hf_set_seed(cfg.seed)
    train_or_resume(trainer, resume_from)

    # 5. Normalize: held-out demonstrations average a reward of 0 (InstructGPT, before RL).
    metrics: dict[str, Any] = final_metrics(trainer)
    normalization: dict[str, Any] = {"data": demo_source}
    if demos is not None:
        demo_examples = encode_demonstrations(demos, tokenizer, r.max_length)
        before = _mean_reward(trainer, demo_examples)
        normalization["shift"] = before
        if r.lora.enabled:  # our loaders subtract config.reward_shift; the merged model gets it in its weights
            trainer.accelerator.unwrap_model(trainer.model).config.reward_shift = before
            normalization["method"] = "config.reward_shift"  # until the merge (`_lora_merge`) says how
        else:
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
        if agreement is not None:  # per prompt (the headline), and pooled over all pairs
            metrics[f"eval/gold_agreement_{name}_samples"] = agreement[0]
            metrics[f"eval/gold_agreement_{name}_samples_pooled"] = agreement[1]
    metrics.update({f"{k}_init": v for k, v in baseline.items()})
    summary = build_summary(STAGE, to_dict(cfg), metrics, started, init=init, resumed_from=resume_from,
                            normalization=normalization)
    save_stage_output(trainer, tokenizer, out, summary, {"scores.jsonl": table},
                      merge=_lora_merge(cfg, init, tokenizer, normalization) if r.lora.enabled else None)
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
        if r.extra_weight != 1.0:  # each prompt's weight in the loss (encode_rankings reads the column)
            train_rows = train_rows.add_column("weight", [1.0] * len(train_rows))
            extra = [x.add_column("weight", [r.extra_weight] * len(x)) for x in extra]
        train_rows = datasets.concatenate_datasets([train_rows, *extra])
    eval_rows = load_rankings(r.data.eval, r.data.skip_invalid, cfg.datasets) if r.data.eval else None
    demo_source = r.normalize_data or cfg.sft.data.eval
    demo_skip = r.data.skip_invalid if r.normalize_data else cfg.sft.data.skip_invalid
    demos = load_demonstrations(demo_source, demo_skip, cfg.datasets) if demo_source else None
    if demos is not None and cfg.chat_prompts:  # scored as the rankings are: the prompt through the chat template
        demos = as_chat(demos)
    return train_rows, eval_rows, demo_source, demos


# ------------------------------------------------------------------------------------------ training


class RankingTrainer(NonFiniteGuard, Trainer):
    """The transformers Trainer with InstructGPT's ranking loss, and an evaluation on held-out rankings, behind
    the non-finite guard (pipeline/guards.py)."""

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
                                 completion_group=group, center_coef=self.rm.center_coef,
                                 group_weights=inputs.get("group_weight"))
        self.check_loss(loss)  # before backward: a NaN stops (or skips) here, the weights untouched
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


def _lora_merge(cfg: Config, init: str, tokenizer: Any, normalization: dict[str, Any]) -> Any:
    """The LoRA reward model's merge: adapter and head into a full-precision copy of `init`, then the
    normalization shift put into its weights (recorded in `normalization`, which the summary holds)."""
    def merge(adapter: Path) -> Any:
        model = lora.merge_reward_model(init, adapter, cfg.model.dtype, len(tokenizer), tokenizer.pad_token_id)
        if "shift" in normalization:
            normalization["method"] = shift_reward(model, normalization["shift"])
        return model
    return merge


def _mean_reward(trainer: RankingTrainer, examples: list[Ranking]) -> float:
    rewards = trainer.score(examples)
    return sum(r[0] for r in rewards) / len(rewards)

