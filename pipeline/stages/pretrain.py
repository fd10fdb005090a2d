"""Stage 1, pretrain: continued causal-LM pretraining of the base model on a text corpus.

setup → train → save:
  1. validate the corpus (train and held-out) before anything else runs;
  2. load the base model (hub id / local directory) or build the tiny GPT-2 and its tokenizer;
  3. tokenize, append EOS to every document, and pack everything into fixed-length blocks;
  4. train with the transformers Trainer, resuming from the stage's last checkpoint if one exists;
  5. evaluate held-out loss and perplexity, then write the Hugging Face directory atomically.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import datasets
from transformers import (
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers import set_seed as hf_set_seed

from pipeline import signals, tracking
from pipeline.checkpoint import StageOutput, build_summary
from pipeline.config import Config, ConfigError, stage_key, to_dict
from pipeline.data import load_corpus, pack_corpus
from pipeline.modeling import context_length, load_base
from pipeline.training import (
    GuardedTrainer,
    check_launch,
    final_metrics,
    save_stage_output,
    train_or_resume,
    trainer_kwargs,
)

log = logging.getLogger(__name__)
STAGE = "pretrain"


@tracking.tracked(STAGE)
def run(cfg: Config, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    started = time.time()
    p = cfg.pretrain
    hf_set_seed(cfg.seed)

    # 1. Data first: a malformed row fails here, before a model is built or a directory written.
    train_corpus, eval_corpus = load_data(cfg)

    # 2. Base model and tokenizer.
    model, tokenizer = load_base(cfg.model, cfg.tokenizer, cfg.datasets)
    max_pos = context_length(model)
    if max_pos and p.block_size > max_pos:
        raise ConfigError(f"'pretrain.block_size' ({p.block_size}) exceeds the model's context ({max_pos})")

    # 3. Packed blocks.
    train_ds = pack_corpus(train_corpus, tokenizer, p.block_size)
    eval_ds = pack_corpus(eval_corpus, tokenizer, p.block_size) if eval_corpus is not None else None
    log.info("pretrain: %d train blocks, %s eval blocks of %d tokens", len(train_ds),
             len(eval_ds) if eval_ds is not None else 0, p.block_size)

    # 4. Train (the Trainer places devices and handles `accelerate launch` on N processes).
    out = StageOutput(cfg.stage_dir(STAGE), stage_key(cfg, STAGE))
    args = TrainingArguments(**trainer_kwargs(cfg, STAGE, out.checkpoints_dir, eval_ds is not None))
    resume_from = out.prepare(is_main=args.process_index == 0)
    trainer = GuardedTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[*tracking.start(cfg, STAGE, is_main=args.process_index == 0), signals.StopOnSignal(STAGE),
                   *(callbacks or [])],
    )
    check_launch(trainer, STAGE)
    trainer.configure_guard(STAGE, p.nan_policy)
    # Reseeded right before training: whatever ran since the first seeding (a baseline measurement that a
    # resumed run skips) must not change the training draws. A resumed run then restores the checkpoint's RNG.
    hf_set_seed(cfg.seed)
    train_or_resume(trainer, resume_from)

    # 5. Evaluate and save atomically.
    metrics: dict[str, Any] = final_metrics(trainer)
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval/loss"] = ev["eval_loss"]
        metrics["eval/perplexity"] = math.exp(min(ev["eval_loss"], 50.0))
    metrics["model/parameters"] = model.num_parameters()
    save_stage_output(trainer, tokenizer, out, build_summary(
        STAGE, to_dict(cfg), metrics, started, resumed_from=resume_from, train_blocks=len(train_ds)))
    log.info("pretrain: wrote %s (%s)", out.final_dir, _fmt(metrics))
    return metrics


def load_data(cfg: Config) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The validated corpus: train, and held-out or None."""
    p = cfg.pretrain
    train_corpus = load_corpus(p.data.train, p.data.skip_invalid, cfg.datasets)
    eval_corpus = load_corpus(p.data.eval, p.data.skip_invalid, cfg.datasets) if p.data.eval else None
    return train_corpus, eval_corpus


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
