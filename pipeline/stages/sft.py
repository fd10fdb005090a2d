"""Stage 2, sft: supervised fine-tuning on demonstrations, with loss on the completion only.

setup → train → save:
  1. validate the demonstrations (train and held-out) before anything else runs;
  2. load the starting model: this profile's pretrain output unless `sft.init` names another;
  3. measure the starting model once (held-out loss under the same completion-only masking, and the
     gold score of sampled completions), so the summary shows what SFT bought;
  4. train with TRL's SFTTrainer: prompt-completion rows get completion-only loss, conversational rows
     assistant-only loss through the chat template's {% generation %} markers (TRL's marked copy of a real
     model's template: `training_chat_template`); resume if interrupted;
  5. measure the fine-tuned model the same way and write the Hugging Face directory atomically.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers import set_seed as hf_set_seed
from transformers.trainer_callback import ExportableState
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.models.utils import unwrap_model_for_generation

from pipeline import lora, signals, tracking
from pipeline.checkpoint import StageOutput, build_summary
from pipeline.config import Config, ConfigError, stage_key, to_dict
from pipeline.data import DataError, as_chat, load_demonstrations, row_origin
from pipeline.evaluation import check_gold_covers, generation_eval, gold_function
from pipeline.guards import NonFiniteGuard
from pipeline.modeling import context_length, load_stage_model
from pipeline.packing import RowPackedCollator, separates_packed_sequences
from pipeline.training import (
    check_launch,
    final_metrics,
    loss_before_training,
    save_stage_output,
    train_or_resume,
    trainer_kwargs,
)

log = logging.getLogger(__name__)
STAGE = "sft"
SAMPLE_COLUMNS = ("prompt", "completion", "gold", "ended", "num_tokens")  # the samples.jsonl fields


@tracking.tracked(STAGE)
def run(cfg: Config, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    started = time.time()
    s = cfg.sft
    hf_set_seed(cfg.seed)

    # 1. Data first: a malformed row fails here, before a model is loaded or a directory written.
    train_ds, eval_ds, conversational = load_data(cfg)

    # 2. Starting model.
    init = s.init or str(cfg.stage_dir("pretrain"))
    lora.check_quantization(cfg, s.lora, STAGE)
    model, tokenizer = load_stage_model(init, make_target=f"pretrain PROFILE={cfg.profile}" if not s.init else None,
                                        quantization=lora.quantization_config(cfg) if s.lora.enabled else None,
                                        trust_remote_code=cfg.model.trust_remote_code)
    if conversational:  # before SFTTrainer, which would stop with a library error on a template it cannot patch
        training_chat_template(tokenizer, init)
    if s.lora.enabled:  # an adapter on the frozen (QLoRA: 4-bit) model
        model = lora.wrap(model, s.lora, "CAUSAL_LM", s.gradient_checkpointing)
    max_pos = context_length(model)
    if max_pos and s.max_length > max_pos:
        raise ConfigError(f"'sft.max_length' ({s.max_length}) exceeds the model's context ({max_pos})")
    if max_pos:
        check_prompt_lengths(cfg, train_ds, "train", tokenizer, max_pos)
        if eval_ds is not None:
            check_prompt_lengths(cfg, eval_ds, "eval", tokenizer, max_pos)
    gold = gold_function(cfg.gold_reward)
    eval_rows = _unique_prompts(list(eval_ds))[: s.generation.num_prompts] if eval_ds is not None else []
    check_gold_covers(gold, eval_rows, tokenizer, "sft.data.eval")

    out = StageOutput(cfg.stage_dir(STAGE), stage_key(cfg, STAGE))
    args = trl_args(cfg, out.checkpoints_dir, eval_ds is not None, conversational)
    resume_from = out.prepare(is_main=args.process_index == 0)
    trainer = GuardedSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[*tracking.start(cfg, STAGE, is_main=args.process_index == 0), signals.StopOnSignal(STAGE),
                   *(callbacks or [])],
    )
    use_packed_rows(trainer, cfg)
    trainer.add_callback(_token_count(trainer))
    check_launch(trainer, STAGE)
    trainer.configure_guard(STAGE, s.nan_policy)

    def measure(tag: str) -> tuple[dict[str, float], list[dict]]:
        metrics: dict[str, float] = {}
        if eval_ds is not None:
            metrics["eval/loss"] = trainer.evaluate()["eval_loss"] if tag != "initial" else loss_before_training(trainer)
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as unwrapped:
            gen, samples = generation_eval(
                unwrapped, tokenizer, eval_rows, s.generation, gold, trainer.accelerator, cfg.seed
            )
        metrics.update({f"eval/{k}": v for k, v in gen.items()})
        tracking.log_metrics({f"eval/{k}": v for k, v in gen.items()}, step=trainer.state.global_step)
        log.info("sft: %s model: %s", tag, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics, samples

    # 3. The starting model, measured once (a resumed run reads the numbers saved before the interruption).
    baseline = out.load_baseline()
    if baseline is None:
        baseline, _ = measure("initial")
        out.save_baseline(baseline)

    # 4. Train.
    # Reseeded right before training: whatever ran since the first seeding (a baseline measurement that a
    # resumed run skips) must not change the training draws. A resumed run then restores the checkpoint's RNG.
    hf_set_seed(cfg.seed)
    train_or_resume(trainer, resume_from)

    # 5. Measure the fine-tuned model and save atomically.
    after, samples = measure("fine-tuned")
    metrics: dict[str, Any] = {**final_metrics(trainer), **after}
    metrics.update({f"{k}_init": v for k, v in baseline.items()})
    summary = build_summary(STAGE, to_dict(cfg), metrics, started, init=init, resumed_from=resume_from,
                            conversational=conversational)
    merge = (lambda adapter: lora.merge_causal_lm(init, adapter, cfg.model.dtype)) if s.lora.enabled else None
    save_stage_output(trainer, tokenizer, out, summary, {"samples.jsonl": samples}, merge=merge)
    tracking.log_table("eval/samples", SAMPLE_COLUMNS, [[r.get(c) for c in SAMPLE_COLUMNS] for r in samples])
    log.info("sft: wrote %s", out.final_dir)
    return metrics


class GuardedSFTTrainer(NonFiniteGuard, SFTTrainer):
    """TRL's SFTTrainer behind the non-finite guard (pipeline/guards.py)."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        before = self._total_train_tokens
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if isinstance(self.data_collator, RowPackedCollator) and self.model.training:
            # TRL counts a batch without an attention mask as its own padding-free layout, one flattened row, and
            # logs that row's width as the batch's tokens; packed rows are B rows: count their real tokens.
            real = self.data_collator.real_tokens(inputs)
            self._total_train_tokens = before + int(self.accelerator.gather_for_metrics(real).sum())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return out


def _token_count(trainer: SFTTrainer) -> TrainerCallback:
    """TRL keeps the count of tokens trained on (the logged `num_tokens`) in the trainer only, so a resumed run
    would count from 0 again. As an `ExportableState` callback, this one's state (the count) goes into every
    checkpoint's trainer_state.json, which a resumed run loads before training starts: the count is handed
    back to the trainer then."""

    class TokenCount(TrainerCallback, ExportableState):
        def state(self) -> dict[str, Any]:
            return {"args": {}, "attributes": {"tokens": trainer._total_train_tokens}}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            saved = state.stateful_callbacks.get(type(self).__name__)
            if isinstance(saved, dict):
                trainer._total_train_tokens = saved["attributes"]["tokens"]

    return TokenCount()


def load_data(cfg: Config) -> tuple[datasets.Dataset, datasets.Dataset | None, bool]:
    """The validated demonstrations (train, held-out or None) and whether they are conversational."""
    s = cfg.sft
    train_ds = load_demonstrations(s.data.train, s.data.skip_invalid, cfg.datasets)
    eval_ds = load_demonstrations(s.data.eval, s.data.skip_invalid, cfg.datasets) if s.data.eval else None
    if cfg.chat_prompts:  # a chat model learns its answers inside its chat template, as it will be prompted
        train_ds, eval_ds = as_chat(train_ds), as_chat(eval_ds) if eval_ds is not None else None
    conversational = "messages" in train_ds.column_names
    if eval_ds is not None and ("messages" in eval_ds.column_names) != conversational:
        raise ConfigError("'sft.data.train' and 'sft.data.eval' use different formats (messages vs prompt/completion)")
    return train_ds, eval_ds, conversational


def check_prompt_lengths(
    cfg: Config, rows: datasets.Dataset, split: str, tokenizer: PreTrainedTokenizerBase, context: int
) -> None:
    """A demonstration whose prompt alone is longer than the model's context trains nothing: `sft.max_length`
    (at most the context) cuts a row's end, so all of its completion goes and TRL drops the row without a word.
    The first such row is an error that names it (file, row, field), like any other bad row."""
    for i, row in enumerate(rows):
        if row.get("messages"):  # the text before the first assistant turn, up to its generation prompt
            turns = row["messages"]
            k = next(j for j, t in enumerate(turns) if t["role"] == "assistant")
            field = "messages"
            text = tokenizer.apply_chat_template(turns[:k], add_generation_prompt=True, tokenize=False) if k else ""
        else:
            field, text = "prompt", row["prompt"]
        if len(text.encode()) <= context:  # a token covers at least one byte: no need to tokenize
            continue
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > context:
            source = getattr(cfg.sft.data, split)
            where = row_origin("demonstrations", source, i, cfg.sft.data.skip_invalid, cfg.datasets)
            raise DataError(
                f"{where}, field '{field}': the prompt is {n} tokens, longer than the model's context ({context}); "
                f"sft.max_length ({cfg.sft.max_length}) cuts a row's end, so none of its completion would be trained "
                "on: shorten the prompt or remove the row"
            )


def trl_args(cfg: Config, output_dir: Path, has_eval: bool, conversational: bool) -> TRLSFTConfig:
    """TRL's SFTConfig for this stage: completion-only loss for prompt-completion rows, assistant-only loss
    (the chat template's {% generation %} spans) for conversational ones.

    `sft.packing`: TRL's best-fit-decreasing packing of whole demonstrations into rows of up to max_length
    tokens, batched by `packing.RowPackedCollator` (set on the trainer by `run`): position ids restart at each
    demonstration, so none attends to another, and the first token of each has no label. The held-out set is
    not packed: its batches hold the same demonstrations as without packing, so `eval/loss` stays comparable
    between packed and unpacked runs.
    """
    return TRLSFTConfig(
        **trainer_kwargs(cfg, STAGE, output_dir, has_eval),
        max_length=cfg.sft.max_length,
        packing=cfg.sft.packing,
        packing_strategy="bfd",
        eval_packing=False,
        completion_only_loss=None if conversational else True,
        assistant_only_loss=conversational,
    )


def use_packed_rows(trainer: SFTTrainer, cfg: Config) -> None:
    """With `sft.packing`, the trainer batches TRL's packed rows as rows (`packing.RowPackedCollator`) instead of
    flattening each batch into one padding-free row (TRL's collator when it packs, which only flash attention
    runs without a dense mask over the whole batch)."""
    if not cfg.sft.packing:
        return
    # Under DeepSpeed the weights may already be partitioned (ZeRO-3) and only the engine can run the model.
    if not trainer.is_deepspeed_enabled and not separates_packed_sequences(trainer.model):
        raise ConfigError(
            f"'sft.packing': {type(trainer.model).__name__} lets packed sequences attend to each other (its "
            "attention mask does not follow restarting position ids), so packed demonstrations would leak into "
            "one another: set sft.packing=false"
        )
    trainer.data_collator = RowPackedCollator(trainer.processing_class.pad_token_id, trainer.args.pad_to_multiple_of)


def training_chat_template(tokenizer: PreTrainedTokenizerBase, source: str = "the model") -> str | None:
    """The chat template SFTTrainer renders conversational rows with for the assistant-only loss: None when the
    tokenizer's own template marks the assistant's tokens with `{% generation %}` (this project's default
    template does), else TRL's training variant of a template it recognises (`get_training_chat_template`).

    Real chat templates (Qwen2.5's, Llama 3's, ...) have no such markers. TRL ships, for each template it knows
    by its exact text, a copy with the markers around each assistant turn's content and end-of-turn token that
    renders the same text; SFTTrainer trains with that copy and leaves the tokenizer's template as it is, so the
    saved model is prompted exactly as it was trained. A template TRL does not know (e.g. Llama 3.1's, with its
    date header) has no copy: that is an error here, before training, saying what to do.
    """
    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise ConfigError(
            f"sft: the chat template of {source} has no {{% generation %}} markers and TRL has no training variant "
            "of it (it has them for Qwen2.5/Qwen3, Llama 3, Gemma, Phi-3, DeepSeek and others), so the assistant-only "
            "loss cannot tell the assistant's tokens from the rest: put {% generation %}...{% endgeneration %} around "
            "each assistant turn's content and end-of-turn token in the model's chat template (chat_template.jinja "
            "or tokenizer_config.json), or give the demonstrations as prompt/completion rows"
        ) from None


def prepare_examples(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, args: TRLSFTConfig, name: str
) -> datasets.Dataset:
    """`rows` tokenized, labelled and truncated by SFTTrainer's own dataset preparation, without a model.

    SFTTrainer prepares its datasets in `__init__`, which needs the model; the dry run must show the same
    `input_ids` and `labels` (-100 = no loss) without loading one. So this runs TRL's `_prepare_dataset` on an
    instance that holds only the three attributes it reads, set as `SFTTrainer.__init__` sets them
    (tests/test_dryrun.py checks the result against a real SFTTrainer's datasets).
    """
    sample = rows[0]
    prep = SFTTrainer.__new__(SFTTrainer)
    prep._tokenizer = tokenizer
    prep.chat_template = training_chat_template(tokenizer) if args.assistant_only_loss else None
    prep.completion_only_loss = (
        "prompt" in sample and "completion" in sample if args.completion_only_loss is None
        else args.completion_only_loss
    )
    packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
    return prep._prepare_dataset(rows, tokenizer, args, packing, None, name)


def _unique_prompts(rows: list[dict]) -> list[dict]:
    """One row per distinct prompt, in file order (demonstrations may repeat a prompt)."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = row["prompt"] if "prompt" in row and row["prompt"] is not None else json.dumps(row["messages"][:-1])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out
