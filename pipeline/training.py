"""What the supervised stages share: Trainer arguments from a typed config, and the save path."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState

from pipeline import distributed, lora
from pipeline.checkpoint import StageOutput, write_jsonl
from pipeline.config import Config, TrainConfig
from pipeline.guards import NonFiniteGuard

log = logging.getLogger(__name__)


def trainer_kwargs(cfg: Config, stage: str, output_dir: Path, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments for `transformers.TrainingArguments` (or TRL's SFTConfig) from stage `stage`'s config.

    The Trainer's own checkpoints go to the stage's work directory; `save_only_model` stays off so they
    hold optimizer, scheduler, RNG and data position and a resumed run continues exactly.
    """
    train: TrainConfig = getattr(cfg, stage)
    eval_strategy = "steps" if (has_eval and train.eval_steps) else "no"
    return {
        "output_dir": str(output_dir),
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.lr,
        "lr_scheduler_type": train.lr_scheduler,
        "warmup_steps": train.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the total steps
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "logging_steps": train.logging_steps,
        "logging_first_step": True,
        "eval_strategy": eval_strategy,
        "eval_steps": train.eval_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "bf16": train.bf16,
        "activation_checkpointing": train.gradient_checkpointing,
        "report_to": "none",  # pipeline.tracking adds its own callbacks (W&B, TensorBoard) with our metric names
        "run_name": f"{cfg.profile}-{stage}",
        # N processes without CUDA: gloo; DDP or DeepSpeed as the launcher selected (pipeline.distributed).
        **distributed.trainer_distributed_kwargs(),
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "disable_tqdm": False,
    }


class GuardedTrainer(NonFiniteGuard, Trainer):
    """The transformers Trainer behind the non-finite guard (pipeline/guards.py)."""
def train_or_resume(trainer: Trainer, resume_from: str | None) -> None:
    """`trainer.train(resume_from_checkpoint=resume_from)`, except when that checkpoint is the last step's.

    A run killed after training (during the final evaluation or save) resumes from the checkpoint the Trainer
    writes at its last step; `Trainer.train` would then take one more optimizer step before it checks
    `max_steps` (when the last step is not at an epoch's end), and the model would differ from the
    uninterrupted run's. Here such a checkpoint's weights and state are loaded and no step is taken. Under
    DeepSpeed the weights live in the engine `train()` builds, so there the Trainer resumes as usual.
    """
    if resume_from and not trainer.is_deepspeed_enabled:
        state = TrainerState.load_from_json(str(Path(resume_from) / TRAINER_STATE_NAME))
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            log.info("%s holds the last step (%d): training is complete, loading it", resume_from, state.global_step)
            trainer._load_from_checkpoint(resume_from)
            trainer.state = state
            # Callbacks that keep state in the checkpoint restore it when training begins, as in `train()`.
            for callback in trainer.callback_handler.callbacks:
                if isinstance(callback, ExportableState):
                    callback.on_train_begin(trainer.args, trainer.state, trainer.control)
            return
    trainer.train(resume_from_checkpoint=resume_from)


def loss_before_training(trainer: Trainer) -> float:
    """The held-out loss of the model before `trainer.train()` (the `eval/loss` a stage reports as `_init`).

    Outside DeepSpeed this is `trainer.evaluate()`. Under DeepSpeed, evaluating before training makes the
    Trainer wrap the model in an inference engine that `train()` then cannot train (and refuses under
    ZeRO-2), so the loss is computed here on the still unwrapped model: each process scores its shard of the
    prepared eval dataloader, and the per-sample losses are gathered without the padding duplicates, as
    `Trainer.evaluate` does.
    """
    if not trainer.is_deepspeed_enabled:
        return float(trainer.evaluate()["eval_loss"])
    accelerator = trainer.accelerator
    model = trainer.model.to(accelerator.device)
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            inputs = {k: v.to(accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            loss = model(**inputs, use_cache=False).loss.detach().float()
            losses.append(accelerator.gather_for_metrics(loss.repeat(len(inputs["input_ids"]))))
    model.train(was_training)
    return float(torch.cat(losses).mean())


def check_launch(trainer: Trainer, stage: str) -> None:
    """Stop before training when the launcher asked for DeepSpeed and the Trainer would run without it, or
    when the DeepSpeed config hard-codes a batch size, accumulation or clipping that contradicts the stage's
    (transformers fills the unset ones from the same arguments, and would only complain once training starts)."""
    distributed.check_backend(trainer.accelerator.distributed_type)
    if trainer.is_deepspeed_enabled:
        args = trainer.args
        distributed.fill_deepspeed_config(trainer.accelerator, {
            "train_micro_batch_size_per_gpu": (args.per_device_train_batch_size, f"{stage}.batch_size"),
            "gradient_accumulation_steps": (args.gradient_accumulation_steps, f"{stage}.grad_accum"),
            "gradient_clipping": (args.max_grad_norm, f"{stage}.max_grad_norm"),
        })


def save_stage_output(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    out: StageOutput,
    summary: dict[str, Any],
    jsonl_files: dict[str, list[dict[str, Any]]] | None = None,
    merge: Callable[[Path], PreTrainedModel] | None = None,
) -> None:
    """Write the finished stage: weights on every process, the rest on the main one, then the atomic swap.

    `save_model` runs on every process because under FSDP / ZeRO-3 gathering the weights is collective.
    Beside the model and tokenizer go `log_history.jsonl` (every logged metric) and any extra jsonl files;
    summary.json is written last and the directory renamed into place by `StageOutput.commit`.
    A LoRA stage (`merge` given) saves its adapter to `adapter/` and `merge(adapter_dir)` to the top level:
    the adapter merged into a full-precision copy of its base (pipeline/lora.py).
    """
    staging = out.begin_final()
    summary = {**summary, "distributed": distributed.describe(trainer.accelerator, model=trainer.model_wrapped)}
    trainer.accelerator.wait_for_everyone()
    # On a peft model the Trainer saves only the adapter.
    trainer.save_model(str(staging if merge is None else staging / lora.ADAPTER_DIR))
    if trainer.is_world_process_zero():
        if merge is not None:
            merge(staging / lora.ADAPTER_DIR).save_pretrained(str(staging))
        # The Trainer pickles its TrainingArguments beside the weights; nothing reads it (summary.json holds
        # the resolved config) and a finished output holds no pickle anyone could be tempted to torch.load.
        for folder in (staging, staging / lora.ADAPTER_DIR):
            (folder / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(staging))
        files = {"log_history.jsonl": trainer.state.log_history, **(jsonl_files or {})}
        for name, rows in files.items():
            write_jsonl(staging / name, rows)
        out.commit(summary)
    trainer.accelerator.wait_for_everyone()


def final_metrics(trainer: Trainer) -> dict[str, float]:
    """Last training loss and step count from the Trainer's state (and, with nan_policy: skip, the steps
    left out for a non-finite loss or gradient)."""
    train_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    metrics = {
        "train/global_step": trainer.state.global_step,
        "train/loss": train_losses[-1] if train_losses else float("nan"),
    }
    if getattr(trainer, "guard_policy", "stop") == "skip":  # steps the non-finite guard left out
        metrics["train/skipped_nonfinite"] = trainer.skipped_nonfinite
    return metrics
