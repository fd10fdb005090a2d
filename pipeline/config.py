"""Typed, strict configs: one YAML profile, a section per stage, `dotted.key=value` overrides.

A profile (configs/<profile>.yaml) is parsed into the `Config` dataclass tree below. Loading is strict,
in the spirit of nanoGPT's configurator: an unknown key fails and names the closest valid key, a value of
the wrong type or out of range fails and names its dotted key. Nothing is silently ignored, because a
typo in `sft.learning_rate` that quietly trains with the default is the kind of mistake an RLHF run
only reveals hours later.

Every field carries a `help` string and, where it matters, bounds (`ge`, `gt`, `le`, `lt`) that are checked at
load time. `python -m pipeline keys` lists every key; `python -m pipeline <stage> --help` (`stage_help`) lists
the keys one stage reads with their values in the chosen profile.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None, **checks: float) -> Any:
    """A dataclass field with a help string and optional numeric bounds (ge/gt/le/lt)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class DataConfig:
    """Where a stage's data comes from: a file, a folder, or a hub data set `owner/name[:split]`."""

    train: str = _f(help="Training data: a .jsonl/.json/.parquet/.csv/.txt file, a folder, or a hub name.")
    eval: str | None = _f(None, help="Held-out data in the same format; null skips held-out evaluation.")
    skip_invalid: bool = _f(
        False, help="Drop rows that fail validation (logging how many and why) instead of stopping at the first."
    )


KINDS = ("corpus", "demonstrations", "rankings", "prompts")

# The fields a registry entry's `columns` may map foreign columns to, per kind (pipeline/data.py reads them).
# `role` and `content` rename the keys inside each turn of `messages`.
COLUMN_TARGETS: dict[str, tuple[str, ...]] = {
    "corpus": ("text",),
    "demonstrations": ("prompt", "completion", "messages", "role", "content"),
    "rankings": ("prompt", "completions", "ranks", "scores", "chosen", "rejected"),
    "prompts": ("prompt", "messages", "role", "content"),
}
# Targets several foreign columns may feed: their non-empty values are joined with a blank line, in order.
JOINABLE_TARGETS = ("prompt", "completion", "text")
ROLE_NAMES = ("system", "user", "assistant")
# A registry name: no "/" or ".", so it can never be mistaken for a file name or a hub id owner/name.
DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(kw_only=True)
class DatasetConfig:
    """One named data set of the registry (`datasets:`): where it is, what kind it is, how its columns map."""

    kind: Literal["corpus", "demonstrations", "rankings", "prompts"] = _f(
        help="What the rows are: corpus (pretrain, ptx), demonstrations (sft, rm normalization), rankings (rm) "
        "or prompts (ppo). A stage data key may only name an entry of the kind it reads."
    )
    path: str | None = _f(None, help="A local .jsonl/.json/.parquet/.csv/.txt file or folder (exclusive with hub).")
    hub: str | None = _f(None, help="A hub data set id owner/name, read with datasets.load_dataset (exclusive with "
                         "path).")
    split: str | None = _f(None, help="Hub split; null = train.")
    subset: str | None = _f(None, help="Hub configuration name (load_dataset's `name`); null = the default.")
    data_dir: str | None = _f(None, help="Folder inside the hub repository (load_dataset's data_dir), e.g. "
                              "hh-rlhf's harmless-base.")
    columns: dict[str, str] = _f(
        factory=dict, help="Foreign column -> our field, e.g. {question: prompt, answer: completion}; `a.b` reads b "
        "inside column a (in each element when a is a list); role/content rename the keys of each turn; several "
        "columns mapped to prompt, completion or text are joined with a blank line.",
    )
    roles: dict[str, str] = _f(
        factory=dict, help="Foreign turn roles -> system/user/assistant, added to ShareGPT's human->user, "
        "gpt->assistant.",
    )

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local file or folder) and 'hub' (owner/name)")
        if self.path is not None:
            given = [k for k in ("split", "subset", "data_dir") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"'{given[0]}' is for hub data sets; a local 'path' is read whole")
        if self.hub is not None and not _HUB_NAME.fullmatch(self.hub):
            raise ValueError(f"'hub' must be a hub data set id owner/name, got {self.hub!r}")
        targets = COLUMN_TARGETS[self.kind]
        fed: dict[str, list[str]] = {}
        for foreign, ours in self.columns.items():
            if ours not in targets:
                close = difflib.get_close_matches(ours, targets, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(
                    f"columns.{foreign}: '{ours}' is not a field of {self.kind}; {hint}({self.kind} fields: "
                    f"{', '.join(targets)})"
                )
            fed.setdefault(ours, []).append(foreign)
        for ours, foreign in fed.items():
            if len(foreign) > 1 and ours not in JOINABLE_TARGETS:
                raise ValueError(
                    f"columns: {', '.join(foreign)} all map to '{ours}'; only {', '.join(JOINABLE_TARGETS)} "
                    "can be joined from several columns"
                )
        if self.roles and "messages" not in targets:
            raise ValueError(f"'roles' renames the roles of messages; {self.kind} have no messages")
        for foreign, ours in self.roles.items():
            if ours not in ROLE_NAMES:
                raise ValueError(f"roles.{foreign}: must be one of {', '.join(ROLE_NAMES)}, got {ours!r}")

    @property
    def location(self) -> str:
        """Where the rows are: the local path, or `owner/name` with its split (and subset, data_dir)."""
        if self.path is not None:
            return self.path
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("subset", "data_dir") if getattr(self, k))
        return f"{self.hub}:{self.split or 'train'}" + (f" ({extra[2:]})" if extra else "")


@dataclass(kw_only=True)
class TinyModelConfig:
    """Shape of the tiny GPT-2 built from scratch when `model.name_or_path` is null."""

    n_layer: int = _f(4, help="Transformer blocks.", ge=1)
    n_embd: int = _f(128, help="Hidden size; must be divisible by n_head.", ge=8)
    n_head: int = _f(4, help="Attention heads.", ge=1)
    n_positions: int = _f(256, help="Maximum sequence length the model can attend over.", ge=16)
    dropout: float = _f(0.1, help="Dropout on embeddings, attention and residuals (GPT-2's 0.1); 0 makes training "
                        "independent of how the batch is split over processes.", ge=0, lt=1)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.tiny.n_embd ({self.n_embd}) must be divisible by model.tiny.n_head ({self.n_head})"
            )


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str | None = _f(
        None, help="Base model: a hub id (e.g. gpt2) or a local Hugging Face directory; null builds the tiny GPT-2."
    )
    tiny: TinyModelConfig = _f(factory=TinyModelConfig, help="Tiny GPT-2 shape (used when name_or_path is null).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _f(
        "float32", help="Weights dtype when loading a pretrained model."
    )
    revision: str | None = _f(None, help="Hub revision (branch, tag or commit) of name_or_path.")
    trust_remote_code: bool = _f(
        False, help="Run Python code shipped with the model or tokenizer (its auto_map); off: only the model "
        "classes transformers ships load. On, every stage loads with it and warns naming the model."
    )
    load_in_4bit: bool = _f(
        False, help="QLoRA: the frozen base of the LoRA stages (sft, rm, ppo with <stage>.lora.r > 0) is loaded in "
        "4-bit (bitsandbytes); the trained adapter stays in full precision and the saved model is merged into a "
        "full-precision copy of the base.",
    )
    load_in_8bit: bool = _f(False, help="Like load_in_4bit, with bitsandbytes' 8-bit weights (LLM.int8).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", help="4-bit data type (QLoRA's NormalFloat4 = nf4).")
    bnb_4bit_use_double_quant: bool = _f(True, help="Quantize the 4-bit quantization constants too (QLoRA).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "bfloat16", help="Dtype the 4-bit weights are dequantized to for each matmul (float32 on CPUs without bf16).",
    )

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("model.load_in_4bit and model.load_in_8bit: choose one")


@dataclass(kw_only=True)
class LoRAConfig:
    """LoRA adapters (peft) instead of full fine-tuning: only the low-rank matrices (and modules_to_save) train."""

    r: int = _f(0, help="Rank of the LoRA matrices; 0 = full fine-tuning (no adapter).", ge=0)
    alpha: float = _f(16.0, help="LoRA scaling numerator: the update is (alpha / r) * B A.", gt=0)
    dropout: float = _f(0.05, help="Dropout on the adapter's input (turned off in ppo with ppo.disable_dropout).",
                        ge=0, lt=1)
    target_modules: list[str] | None = _f(
        None, help="Module names that get an adapter (e.g. [q_proj, v_proj]); null = every linear layer of the "
        "transformer blocks (peft's all-linear, QLoRA's choice), the output head excluded.",
    )
    modules_to_save: list[str] = _f(
        factory=list, help="Modules trained in full besides the adapters (e.g. [embed_tokens]); the reward "
        "model's scalar head (score) always is. In a model with tied embeddings (GPT-2) the output head trains "
        "with the embedding, as one matrix.",
    )

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(kw_only=True)
class TokenizerConfig:
    name_or_path: str | None = _f(
        None, help="Tokenizer hub id or directory; null: the model's own, or for the tiny model a new byte-level BPE."
    )
    train_data: str = _f(
        "data/tiny/corpus.train.jsonl", help="Corpus the tiny byte-level BPE tokenizer is trained on."
    )
    vocab_size: int = _f(2048, help="Vocabulary size of the tiny BPE tokenizer (special tokens included).", ge=300)


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment tracking of every stage (pipeline/tracking.py); the stages' own files are written regardless."""

    wandb: bool = _f(
        True,
        help="Log each stage to Weights & Biases (one run per stage, grouped per pipeline run). Without a "
        "W&B login it logs offline under <run_dir>/wandb ($WANDB_DIR/wandb when set); WANDB_MODE=offline|disabled "
        "is respected.",
    )
    project: str = _f("rlhf-pipeline", help="W&B project; the WANDB_PROJECT variable wins when set.")
    entity: str | None = _f(
        None, help="W&B entity (team or user); null uses your default; the WANDB_ENTITY variable wins when set."
    )
    log_model: bool = _f(False, help="Upload each stage's final model directory as a W&B artifact.")
    tensorboard: bool = _f(
        False, help="Also write TensorBoard event files to <run_dir>/tensorboard/<stage> (needs tensorboard)."
    )


@dataclass(kw_only=True)
class TrainConfig:
    """Optimization knobs shared by the stages trained with a transformers Trainer (pretrain, sft, rm)."""

    epochs: float = _f(1.0, help="Passes over the training data (ignored when max_steps > 0).", gt=0)
    max_steps: int = _f(-1, help="Stop after this many optimizer steps; -1 runs `epochs` epochs.", ge=-1)
    batch_size: int = _f(16, help="Sequences per device per micro-batch.", ge=1)
    grad_accum: int = _f(1, help="Micro-batches accumulated per optimizer step.", ge=1)
    lr: float = _f(5e-4, help="Peak learning rate (AdamW).", gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f(
        "cosine", help="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = _f(0.05, help="Fraction of steps spent warming the learning rate up.", ge=0, le=0.5)
    weight_decay: float = _f(0.0, help="AdamW weight decay.", ge=0)
    max_grad_norm: float = _f(1.0, help="Gradient clipping norm.", gt=0)
    logging_steps: int = _f(10, help="Log training metrics every N optimizer steps.", ge=1)
    eval_steps: int | None = _f(None, help="Evaluate every N steps; null evaluates only at the end.", ge=1)
    save_steps: int = _f(100, help="Write a resumable training checkpoint every N optimizer steps.", ge=1)
    save_total_limit: int = _f(2, help="Training checkpoints kept while the stage runs.", ge=1)
    bf16: bool = _f(False, help="Mixed precision in bfloat16 (GPUs that support it).")
    gradient_checkpointing: bool = _f(False, help="Trade compute for activation memory.")
    nan_policy: Literal["stop", "skip"] = _f(
        "stop", help="A non-finite loss or gradient norm: stop the stage (the last good checkpoint stays the "
        "newest) or skip that batch's update and count it in train/skipped_nonfinite."
    )


@dataclass(kw_only=True)
class GenerationEvalConfig:
    """Sampled generations on held-out prompts, scored by the gold reward when the profile has one."""

    num_prompts: int = _f(96, help="Held-out prompts to sample (0 disables generation eval).", ge=0)
    samples_per_prompt: int = _f(4, help="Samples per prompt (greedy decoding hides differences).", ge=1)
    max_new_tokens: int = _f(24, help="Generation budget per sample.", ge=1)
    temperature: float = _f(1.0, help="Sampling temperature.", gt=0)
    batch_size: int = _f(64, help="Prompts per generation batch.", ge=1)


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """Continued causal-LM pretraining on a corpus of `{"text": ...}` rows, packed into fixed blocks."""

    data: DataConfig = _f(help="Corpus: train and held-out eval source.")
    block_size: int = _f(128, help="Tokens per packed training block.", ge=8)


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations; loss on completion (assistant) tokens only."""

    data: DataConfig = _f(help="Demonstrations: train and held-out eval source.")
    init: str | None = _f(
        None, help="Model to fine-tune: a directory or hub id; null = this profile's pretrain output."
    )
    max_length: int = _f(128, help="Longest tokenized prompt+completion; longer rows are truncated.", ge=8)
    packing: bool = _f(
        False, help="Pack whole demonstrations into rows of up to max_length tokens (TRL's best-fit decreasing); "
        "position ids restart at each demonstration, so none attends to another (the stage checks the model's "
        "attention does this). No padding is computed; batch_size then counts packed rows, so an epoch takes "
        "fewer optimizer steps: divide it by the packing factor `--dry-run` prints to keep the step size.",
    )
    generation: GenerationEvalConfig = _f(
        factory=GenerationEvalConfig, help="Sampled-generation eval of the initial and final model."
    )
    lora: LoRAConfig = _f(factory=LoRAConfig, help="LoRA / QLoRA adapter instead of full fine-tuning (lora.r > 0).")


@dataclass(kw_only=True)
class RMConfig(TrainConfig):
    """Reward model on ranked completions: all comparisons of one prompt in one batch element (InstructGPT)."""

    data: DataConfig = _f(help="Rankings (ranked K-way, pairwise chosen/rejected, or hh-rlhf): train and held-out eval.")
    init: str | None = _f(
        None, help="Model to start from: a directory or hub id; null = this profile's sft output."
    )
    max_length: int = _f(
        128, help="Longest tokenized prompt+completion+EOS; longer ones lose the prompt's start first.", ge=8
    )
    margin: float = _f(
        0.0, help="Margin per rank of difference: loss -log sigmoid(r_w - r_l - margin*(rank_l - rank_w)); 0 = off.",
        ge=0,
    )
    center_coef: float = _f(
        0.0, help="Weight of the reward-centering term coef * (mean reward of a prompt's completions)^2; 0 = off.",
        ge=0,
    )
    disable_dropout: bool = _f(
        True, help="Turn dropout off: the loss compares rewards, and dropout noise on each side blurs them."
    )
    normalize_data: str | None = _f(
        None,
        help="Held-out demonstrations whose mean reward is shifted to 0 after training; null = sft.data.eval.",
    )
    num_table_prompts: int = _f(
        16, help="Held-out prompts whose completions, ranks and rewards go to scores.jsonl (and the tracker).",
        ge=0,
    )
    extra_train: list[str] = _f(
        factory=list, help="More ranking sources trained on together with rm.data.train, e.g. the rankings each "
        "RLHF round collected on its policy's samples (make iterate); each is validated like rm.data.train.",
    )
    extra_weight: float = _f(
        1.0, help="Weight of each rm.extra_train prompt in the loss's mean over prompts, a rm.data.train prompt "
        "weighing 1: a round's few hundred rankings of its policy's samples can count as much as the thousands "
        "the reward model started from.", gt=0,
    )
    policy_samples: str | None = _f(
        None, help="A finished policy stage directory (e.g. the last round's ppo output) whose held-out samples "
        "(samples.jsonl, with gold scores) the RM is checked on: eval/gold_agreement_policy_samples (per prompt; "
        "_pooled: over all pairs). The SFT samples of rm.init are always checked (eval/gold_agreement_sft_samples).",
    )
    lora: LoRAConfig = _f(factory=LoRAConfig, help="LoRA / QLoRA adapter (lora.r > 0); the scalar head trains in full.")


@dataclass(kw_only=True)
class PPOConfig:
    """PPO-ptx (InstructGPT): the policy from SFT against the frozen reward model, a per-token KL penalty to the
    frozen SFT reference, and γ_ptx × the LM loss of pretraining-corpus batches on every optimizer step."""

    data: DataConfig = _f(help="Prompts (`prompt` or `messages` rows): train and held-out eval source.")
    init: str | None = _f(
        None, help="Policy to start from, also the frozen KL reference unless ppo.reference is set: a directory or "
        "hub id; null = the sft output."
    )
    reference: str | None = _f(
        None, help="Frozen KL reference when it differs from ppo.init (the held-out `_init` metrics stay those "
        "of ppo.init), e.g. a later RLHF round continuing from the last policy but penalized against SFT; null = ppo.init."
    )
    reward_model: str | None = _f(
        None, help="Frozen reward model: a directory or hub id; null = this profile's rm output."
    )
    reward: Literal["model", "gold"] = _f(
        "model", help="What PPO maximizes: the reward model's score, or (an oracle run, tiny task only) the gold "
        "reward itself, which shows the gain a perfect reward model would allow."
    )
    value_init: str | None = _f(
        None, help="Value model to start from (a reward-model directory); null = the reward model (InstructGPT)."
    )
    ptx_data: str | None = _f(
        None, help="Pretraining corpus of the ptx term ({\"text\"} rows); null = pretrain.data.train."
    )
    ptx_eval_data: str | None = _f(
        None, help="Held-out corpus whose LM loss is reported before and after PPO; null = pretrain.data.eval."
    )
    iterations: int = _f(60, help="PPO iterations: each samples a rollout batch, then optimizes on it.", ge=1)
    rollout_batch_size: int = _f(64, help="Prompts sampled per iteration on each process (one completion each).", ge=1)
    minibatch_size: int = _f(16, help="Completions per optimizer step on each process; must divide rollout_batch_size.",
                             ge=1)
    generation_batch_size: int | None = _f(
        None, help="Prompts per `generate` call in rollouts (each chunk has its own seed, fixed by its place in the "
        "global batch); must divide rollout_batch_size; null = the whole rollout batch at once.", ge=1,
    )
    gather_for_generation: bool = _f(
        True, help="Under ZeRO-3, gather the policy's shards once per rollout so each rank generates alone; false "
        "for a policy too big for one device (every decoding step is then a collective: slower).",
    )
    ppo_epochs: int = _f(4, help="Passes over each rollout batch.", ge=1)
    lr: float = _f(1e-5, help="AdamW learning rate of the policy and the value model.", gt=0)
    lr_scheduler: Literal["linear", "constant"] = _f(
        "linear", help="linear decays the learning rate to 0 over the run (as in the N+ details); or constant."
    )
    warmup_ratio: float = _f(
        0.0, help="Fraction of the optimizer steps spent warming the learning rate up from 0.", ge=0, le=0.5
    )
    weight_decay: float = _f(0.0, help="AdamW weight decay.", ge=0)
    max_grad_norm: float = _f(1.0, help="Gradient clipping norm.", gt=0)
    max_prompt_length: int = _f(64, help="Longest prompt in tokens; longer ones lose their start.", ge=1)
    max_new_tokens: int = _f(24, help="Completion budget; a completion that has not emitted EOS by then is cut.", ge=1)
    temperature: float = _f(1.0, help="Sampling temperature (the log-probs PPO optimizes are at this temperature).",
                            gt=0)
    top_k: int = _f(0, help="Sample from the k most likely tokens only; 0 = off (off during RL is standard).", ge=0)
    top_p: float = _f(1.0, help="Nucleus sampling mass; 1 = off.", gt=0, le=1)
    logprobs_from_sampling: bool | None = _f(
        None, help="Read the policy's old log-probs from the logits sampling computed (no second policy forward over "
        "the completions) instead of recomputing them; they agree to float32 rounding, but cached decoding under "
        "bf16/fp16 or a quantized policy drifts further from the update's full forward. null = on in float32, "
        "off under mixed precision or quantization.",
    )
    kl_coef: float = _f(0.02, help="β of the per-token KL penalty −β(log π − log π_ref) (InstructGPT: 0.02).", ge=0)
    target_kl: float | None = _f(
        None, help="Adaptive KL controller (Ziegler et al. 2019): the KL per completion β is steered to; null = fixed β.",
        gt=0,
    )
    kl_horizon: float = _f(10000, help="Horizon (completions) of the adaptive KL controller.", gt=0)
    missing_eos_penalty: float | None = _f(
        None, help="Subtracted from the reward-model score of a completion that never emitted EOS; null = off.", ge=0
    )
    gamma: float = _f(1.0, help="Discount of GAE.", ge=0, le=1)
    lam: float = _f(0.95, help="λ of GAE.", ge=0, le=1)
    clip_range: float = _f(0.2, help="ε of the clipped surrogate: the probability ratio is clipped to 1 ± ε.", gt=0)
    clip_range_value: float = _f(0.2, help="Values may move this far from their rollout value before clipping.",
                                 gt=0)
    vf_coef: float = _f(0.1, help="Weight of the value loss.", ge=0)
    log_ratio_clamp: float | None = _f(
        None, help="Clamp each token's log(π/π_old) to ±this before exp in the policy loss (OpenRLHF does); a token "
        "whose log-ratio runs away (~100 nats) with a negative advantage otherwise makes the loss infinite. "
        "null = off (the TRL math); 20 changes nothing in a healthy run.", gt=0
    )
    nan_policy: Literal["stop", "skip"] = _f(
        "stop", help="A non-finite loss, gradient norm, reward, advantage or KL: stop the stage (the last good "
        "checkpoint stays the newest) or skip that minibatch (or rollout) and count it in ppo/skipped_nonfinite."
    )
    whiten_rewards: bool = _f(False, help="Scale rewards by their batch std before GAE (the mean is kept).")
    ptx_coef: float = _f(
        1.0, help="γ_ptx: weight of the pretraining LM loss on each optimizer step; 0 = plain PPO (no ptx term).",
        ge=0,
    )
    ptx_batch_size: int = _f(8, help="Corpus blocks in the ptx term of each optimizer step (per process).", ge=1)
    ptx_block_size: int = _f(128, help="Tokens per packed corpus block of the ptx term.", ge=8)
    eval_steps: int | None = _f(
        None, help="Evaluate on held-out prompts every N iterations; null = before and after training only.", ge=1
    )
    eval_prompts: int = _f(96, help="Held-out prompts in each evaluation.", ge=1)
    eval_samples_per_prompt: int = _f(4, help="Sampled completions per held-out prompt (temperature 1).", ge=1)
    eval_batch_size: int = _f(64, help="Completions sampled per batch in evaluation.", ge=1)
    eval_corpus_blocks: int = _f(64, help="Held-out corpus blocks of the corpus-loss evaluation (0 = off).", ge=0)
    logging_steps: int = _f(1, help="Log metrics every N iterations.", ge=1)
    table_steps: int = _f(10, help="Log a table of sample completions every N iterations.", ge=1)
    save_steps: int = _f(20, help="Write a resumable checkpoint every N iterations.", ge=1)
    save_total_limit: int = _f(2, help="Checkpoints kept while the stage runs.", ge=1)
    disable_dropout: bool = _f(True, help="Turn dropout off in every model, so rollout and training log-probs agree.")
    bf16: bool = _f(False, help="Mixed precision in bfloat16 (GPUs that support it).")
    gradient_checkpointing: bool = _f(False, help="Trade compute for activation memory in the PPO update.")
    # With LoRA one base model is in memory: the policy and the value model are adapters on it, the KL
    # reference is the base with the adapters off, and an RM trained with rm.lora on the same SFT model is a
    # frozen adapter on it too (pipeline/peft_models.py).
    lora: LoRAConfig = _f(factory=LoRAConfig, help="LoRA / QLoRA (lora.r > 0): one base model in memory.")

    def __post_init__(self) -> None:
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(
                f"ppo.minibatch_size ({self.minibatch_size}) must divide ppo.rollout_batch_size "
                f"({self.rollout_batch_size})"
            )
        if self.generation_batch_size:
            if self.rollout_batch_size % self.generation_batch_size:
                raise ConfigError(
                    f"ppo.generation_batch_size ({self.generation_batch_size}) must divide ppo.rollout_batch_size "
                    f"({self.rollout_batch_size})"
                )
            chunks = self.rollout_batch_size // self.generation_batch_size
            if self.minibatch_size % chunks:  # every minibatch takes an equal slice of every chunk
                raise ConfigError(
                    f"ppo.minibatch_size ({self.minibatch_size}) must be a multiple of ppo.rollout_batch_size / "
                    f"ppo.generation_batch_size ({chunks})"
                )


@dataclass(kw_only=True)
class LabelConfig:
    """Rank the policy's own samples (pipeline/stages/label.py): sample K completions per prompt from a finished
    policy into a to-label file, then rank them with the gold reward (a simulated labeler) or people (a web page)."""

    policy: str = _f(
        "sft", help="Policy whose samples are ranked: sft or ppo (this profile's output) or a model directory."
    )
    prompts: str | None = _f(None, help="Prompt source (`prompt` or `messages` rows); null = ppo.data.train.")
    num_prompts: int = _f(256, help="Prompts drawn (shuffled by the seed) from the prompt source (see label.draw).",
                          ge=1)
    draw: Literal["distinct", "source"] = _f(
        "distinct", help="distinct: each distinct prompt at most once; source: the source's rows, repeats included, "
        "so a prompt is labeled as often as PPO trains on it (and its held-out evaluation asks it): the reward "
        "model learns most where the policy acts most.",
    )
    k: int = _f(4, help="Completions sampled per prompt (InstructGPT: 4 to 9); duplicates and empty ones are "
                "dropped, so a row may show fewer.", ge=2)
    temperature: float = _f(1.0, help="Sampling temperature.", gt=0)
    max_new_tokens: int = _f(24, help="Completion budget; a completion without EOS by then is cut (and shown so).",
                             ge=1)
    batch_size: int = _f(64, help="Prompts per generation batch (each with its k samples).", ge=1)
    seed: int | None = _f(None, help="Seed of the prompt draw, the samples and the labeler noise; null = seed.",
                          ge=0)
    reward_model: str | None = _f(
        None, help="The reward model that judged this policy (e.g. the last round's rm output): its gold agreement "
        "on the policy's held-out samples (the policy dir's samples.jsonl) is reported as rm_gold_agreement (per "
        "prompt; rm_gold_agreement_pooled: over all pairs), the "
        "number a new round of labels should raise (make iterate sets it); null = not measured.",
    )
    labeler: Literal["gold", "human"] = _f(
        "human", help="gold: the gold reward ranks (needs gold_reward) into rankings.jsonl; human: only the "
        "to-label file is written, people rank it on the page of `python -m pipeline label --serve`.",
    )
    noise: float = _f(
        0.0, help="Gold labeler: expected fraction of its comparisons that disagree with gold (InstructGPT's "
        "labelers agree ~73%: 0.27); close pairs flip more often than distant ones (Thurstone model, README).",
        ge=0, le=0.5,
    )
    tie_threshold: float = _f(
        1e-6, help="Gold labeler: sorted gold scores no further apart than this share a rank (chained).", ge=0
    )


@dataclass(kw_only=True)
class RoundsConfig:
    """RLHF rounds 2.. (`make iterate`, runs/<profile>/round-<r>/): what a profile changes for them."""

    overrides: list[str] = _f(
        factory=list, help="dotted.key=value settings for the runs of rounds 2.. only (round >= 2), applied over "
        "the profile and under the command line, e.g. [rm.epochs=6]: a round's reward model fits its policy's "
        "rankings better with more passes than round 1's (README, RLHF rounds).",
    )


@dataclass(kw_only=True)
class Config:
    """A whole pipeline profile."""

    profile: str = _f("", help="Profile name; defaults to the config file's stem (configs/tiny.yaml -> tiny).")
    seed: int = _f(0, help="Seed for data order, initialisation and sampling.", ge=0)
    run_dir: str = _f("", help="Where stage outputs go; defaults to runs/<profile>.")
    gold_reward: Literal["tinytask"] | None = _f(
        None, help="Gold reward that scores sampled generations (tinytask for the toy task; null for real data)."
    )
    chat_prompts: bool = _f(
        False, help="Chat models: every plain-text prompt becomes one user turn rendered through the tokenizer's "
        "chat template (sft's prompt-completion rows, rm rankings and normalization demonstrations, ppo and label "
        "prompts), so the model always sees a prompt the way it is chatted with. Messages rows always are.",
    )
    model: ModelConfig = _f(factory=ModelConfig, help="Base model.")
    tokenizer: TokenizerConfig = _f(factory=TokenizerConfig, help="Tokenizer.")
    tracking: TrackingConfig = _f(factory=TrackingConfig, help="Experiment tracking.")
    datasets: dict[str, DatasetConfig] = _f(
        factory=dict, help="The data registry: named data sets (path or hub id, kind, column map) that the data keys "
        "of the stages may name instead of a path.",
    )
    pretrain: PretrainConfig = _f(help="Stage 1: continued pretraining.")
    sft: SFTConfig = _f(help="Stage 2: supervised fine-tuning.")
    rm: RMConfig = _f(help="Stage 3: reward model.")
    ppo: PPOConfig = _f(help="Stage 4: PPO-ptx against the reward model.")
    label: LabelConfig = _f(factory=LabelConfig, help="Ranking the policy's own samples (gold or people).")
    round: int = _f(
        1, help="The RLHF round this run belongs to: 1 = the chain (pretrain, sft, rm, ppo); make iterate sets "
        "2, 3, ... for runs/<profile>/round-<r>/, which take rounds.overrides.", ge=1,
    )
    rounds: RoundsConfig = _f(factory=RoundsConfig, help="Settings of RLHF rounds 2.. (make iterate).")

    def __post_init__(self) -> None:
        for name in self.datasets:
            if not DATASET_NAME.fullmatch(name):
                raise ConfigError(
                    f"datasets.{name}: a data set name may hold letters, digits, '_' and '-' only (no '/' or '.', "
                    "which would read as a file name or a hub id)"
                )

    def stage_dir(self, stage: str) -> Path:
        """The finished output directory of `stage` for this profile."""
        return Path(self.run_dir) / stage


STAGES = ("pretrain", "sft", "rm", "ppo", "label")

# How the LoRA stages load their frozen base (QLoRA): part of what sft, rm and ppo produce.
QUANTIZATION_KEYS = ("model.load_in_4bit", "model.load_in_8bit", "model.bnb_4bit_quant_type",
                     "model.bnb_4bit_use_double_quant", "model.bnb_4bit_compute_dtype")
# The model keys sft, rm and ppo read (the dtype: what a LoRA adapter is merged in).
MODEL_READS = ("model.dtype", "model.trust_remote_code", *QUANTIZATION_KEYS)

# The top-level keys besides its own section that shape each stage's result. They decide when an
# interrupted run may resume, and when `make` must rebuild a stage (see `python -m pipeline stamp`).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("seed", "model", "tokenizer"),
    "sft": ("seed", "gold_reward", "chat_prompts", "model.dtype", *QUANTIZATION_KEYS),
    "rm": ("seed", "gold_reward", "chat_prompts", "model.dtype", *QUANTIZATION_KEYS),
    "ppo": ("seed", "gold_reward", "chat_prompts", "model.dtype", *QUANTIZATION_KEYS),
    "label": ("seed", "gold_reward", "chat_prompts"),
}


# Everything besides its own section that each stage reads (in the stage, or through tracking, checkpoint and
# modeling): `python -m pipeline <stage> --help` lists these keys too. Whole sections or single dotted keys;
# tests/test_cli.py checks every `cfg.<key>` a stage module touches is covered here.
STAGE_READS: dict[str, tuple[str, ...]] = {
    "pretrain": ("profile", "seed", "run_dir", "model", "tokenizer", "tracking", "datasets"),
    # model: trust_remote_code (every stage loads its models with it; it changes no output), and for the LoRA
    # stages the quantization keys and dtype (the dtype the adapter is merged in).
    "sft": ("profile", "seed", "run_dir", "gold_reward", "chat_prompts", "tracking", "datasets", *MODEL_READS),
    # rm.normalize_data falls back to the SFT held-out demonstrations.
    "rm": ("profile", "seed", "run_dir", "gold_reward", "chat_prompts", "tracking", "datasets", "sft.data.eval",
           "sft.data.skip_invalid", *MODEL_READS),
    # ppo.ptx_data / ppo.ptx_eval_data fall back to the pretraining corpus.
    "ppo": ("profile", "seed", "run_dir", "gold_reward", "chat_prompts", "tracking", "datasets",
            "pretrain.data.train", "pretrain.data.eval", *MODEL_READS),
    # label.prompts falls back to the PPO prompts; label.policy names the sft or ppo output (run_dir).
    "label": ("profile", "seed", "run_dir", "gold_reward", "chat_prompts", "datasets", "ppo.data.train",
              "model.trust_remote_code"),
}


# The keys load_config itself consumes (a later round's run takes rounds.overrides): no stage reads them.
LOAD_KEYS = ("round", "rounds")


def stage_key(cfg: Config, stage: str) -> dict[str, Any]:
    """The part of the resolved config that determines `stage`'s output.

    With the registry entries its data keys name: editing one rebuilds (and forbids resuming) the stages that
    read it, and no other.
    """
    d = to_dict(cfg)
    key = {k: _lookup(d, k) for k in (*STAGE_INPUTS[stage], stage)}
    if "model" in key and not set(QUANTIZATION_KEYS) & set(STAGE_INPUTS[stage]):
        # pretrain trains the full model: turning QLoRA on for the later stages must not rebuild it
        key["model"] = {k: v for k, v in key["model"].items() if f"model.{k}" not in QUANTIZATION_KEYS}
    used = sorted({s.value for s in data_sources(cfg, stage) if s.entry is not None})
    if used:
        key["datasets"] = {name: d["datasets"][name] for name in used}
    return key


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


# --------------------------------------------------------------------------------------------- data keys


@dataclass(frozen=True)
class DataSource:
    """A data key of a stage, resolved: its value, the kind of rows it must hold, and its registry entry."""

    key: str  # dotted key, with the key it defaults to: "rm.normalize_data (null: sft.data.eval)"
    value: str
    kind: str
    entry: DatasetConfig | None  # the registry entry `value` names, or None for a path or hub id

    @property
    def location(self) -> str:
        return self.entry.location if self.entry is not None else self.value

    @property
    def local_path(self) -> str | None:
        """The local file or folder behind the source (what `make` fingerprints); None for hub data."""
        if self.entry is not None:
            return self.entry.path
        return self.value


def data_sources(cfg: Config, stage: str) -> list[DataSource]:
    """Every data source `stage` reads, defaults filled in, registry names resolved."""
    keys: list[tuple[str, str | None, str]] = []
    if stage == "label":  # its prompts; the policy it samples is a make prerequisite, not a data file
        keys.append(_defaulted("label.prompts", cfg.label.prompts, "ppo.data.train", cfg.ppo.data.train, "prompts"))
        return [DataSource(key, value, kind, cfg.datasets.get(value)) for key, value, kind in keys if value]
    section = getattr(cfg, stage)
    own_kind = {"pretrain": "corpus", "sft": "demonstrations", "rm": "rankings", "ppo": "prompts"}[stage]
    keys += [(f"{stage}.data.train", section.data.train, own_kind), (f"{stage}.data.eval", section.data.eval, own_kind)]
    if stage == "rm":
        keys += [(f"rm.extra_train[{i}]", source, "rankings") for i, source in enumerate(cfg.rm.extra_train)]
    if stage == "pretrain" and cfg.model.name_or_path is None and cfg.tokenizer.name_or_path is None:
        keys.append(("tokenizer.train_data", cfg.tokenizer.train_data, "corpus"))  # the tiny tokenizer's corpus
    if stage == "rm":  # the reward is normalized on held-out demonstrations
        keys.append(_defaulted("rm.normalize_data", cfg.rm.normalize_data, "sft.data.eval", cfg.sft.data.eval,
                               "demonstrations"))
    if stage == "ppo":  # the ptx term's corpus and the held-out corpus of its evaluation
        keys.append(_defaulted("ppo.ptx_data", cfg.ppo.ptx_data, "pretrain.data.train", cfg.pretrain.data.train,
                               "corpus"))
        keys.append(_defaulted("ppo.ptx_eval_data", cfg.ppo.ptx_eval_data, "pretrain.data.eval",
                               cfg.pretrain.data.eval, "corpus"))
    return [DataSource(key, value, kind, cfg.datasets.get(value)) for key, value, kind in keys if value]


def _defaulted(
    key: str, value: str | None, default_key: str, default: str | None, kind: str
) -> tuple[str, str | None, str]:
    """A data key whose null means another key's source: labelled with both."""
    return (key, value, kind) if value else (f"{key} (null: {default_key})", default, kind)


def check_data_keys(cfg: Config) -> None:
    """Every data key that names a registry entry names one of the kind it reads; a bare name that is neither an
    entry nor an existing file or folder is an error now, not when the stage reaches it."""
    checked = [s for stage in STAGES for s in data_sources(cfg, stage)]
    checked.append(DataSource("tokenizer.train_data", cfg.tokenizer.train_data, "corpus",
                              cfg.datasets.get(cfg.tokenizer.train_data)))
    for s in checked:
        key = s.key.split(" ")[0]
        if s.entry is not None:
            if s.entry.kind != s.kind:
                raise ConfigError(
                    f"'{key}' names data set '{s.value}' (datasets.{s.value}.kind: {s.entry.kind}), but "
                    f"{key.split('.')[0]} reads {s.kind} there"
                )
        elif DATASET_NAME.fullmatch(s.value) and not Path(s.value).exists():
            names = sorted(cfg.datasets)
            close = difflib.get_close_matches(s.value, names, n=1, cutoff=0.5)
            known = f"did you mean '{close[0]}'? " if close else ""
            listed = f"the registry has {', '.join(names)}" if names else "the profile has no `datasets:` registry"
            raise ConfigError(
                f"'{key}': '{s.value}' is neither a data set of the registry ({known}{listed}) nor an existing file "
                "or folder"
            )


def describe_sources(cfg: Config) -> list[str]:
    """One line per data source of every stage, registry names resolved (for `python -m pipeline config`)."""
    lines = []
    for stage in STAGES:
        for s in data_sources(cfg, stage):
            where = f"{s.value} = {s.location}" if s.entry is not None else s.value
            what = s.kind
            if s.entry is not None and s.entry.columns:
                what += "; columns " + ", ".join(f"{a} -> {b}" for a, b in s.entry.columns.items())
            if s.entry is not None and s.entry.roles:
                what += "; roles " + ", ".join(f"{a} -> {b}" for a, b in s.entry.roles.items())
            lines.append(f"{s.key:<44} {where}  [{what}]")
    return lines


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML profile, apply `dotted.key=value` overrides, and validate everything strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _with_includes(_read_mapping(path), path)
    cli = [_split_override(item, f"override {item!r}") for item in overrides]
    # A later round's run takes the profile's rounds.overrides, under the command line's own settings. Which
    # round, and those overrides, may themselves come from the command line, so look at the merged result first.
    merged = copy.deepcopy(raw)
    for key, value in cli:
        _set_dotted(merged, key, value)
    from_rounds = _round_overrides(merged.get("rounds"), path) if _is_later_round(merged.get("round", 1)) else []
    for key, value in (*from_rounds, *cli):
        _set_dotted(raw, key, value)
    raw.setdefault("profile", path.stem)
    try:
        cfg = build(Config, raw)
    except ConfigError as e:
        if any(f"'{key}" in str(e) for key, _ in from_rounds):
            raise ConfigError(f"{path}: rounds.overrides: {e}") from None
        raise
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{cfg.profile}"
    check_data_keys(cfg)
    return cfg


def _split_override(item: Any, where: str) -> tuple[str, Any]:
    """`dotted.key=value` -> (key, parsed value), or one error naming where the item came from."""
    key, sep, value = item.partition("=") if isinstance(item, str) else ("", "", "")
    if not sep or not key.strip():
        raise ConfigError(f"{where} is not of the form dotted.key=value")
    return key.strip(), _parse_scalar(value)


def _is_later_round(value: Any) -> bool:
    # A malformed round is left for build() to report with its key name; here it only decides nothing.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2


def _round_overrides(rounds: Any, path: Path) -> list[tuple[str, Any]]:
    """The profile's rounds.overrides as (key, value) pairs, each checked to be a plain setting."""
    items = rounds.get("overrides", []) if isinstance(rounds, dict) else []
    if not isinstance(items, list):
        raise ConfigError(f"{path}: rounds.overrides must be a list of dotted.key=value strings, got {items!r}")
    pairs = [_split_override(item, f"{path}: rounds.overrides[{i}] ({item!r})") for i, item in enumerate(items)]
    for i, (key, _) in enumerate(pairs):
        if key.split(".")[0] in ("round", "rounds", "run_dir", "profile"):
            raise ConfigError(f"{path}: rounds.overrides[{i}] sets '{key}', which decides what a round is or where "
                              "it goes; make iterate sets it")
    return pairs


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file of config keys (a profile, or a file it includes): one clear error if it is not one."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(path, e)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return raw


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """One line: where the YAML breaks and why (PyYAML's own message spans several, with a caret drawing)."""
    mark = getattr(e, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    context = getattr(e, "context", None)
    return f"{path}{where}: not valid YAML ({what}" + (f", {context}" if context else "") + ")"


def _with_includes(raw: dict[str, Any], path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The profile merged over the YAML files its `include:` list names (relative to the current directory,
    like every other path in a profile, so a copied profile still finds them).

    Mappings merge key by key and the profile's own values win, so a profile can include the shipped
    registry (configs/datasets/hub.yaml) and still override one entry's split, or include another profile and
    change a few keys (configs/tiny-lora.yaml).
    """
    includes = raw.pop("include", None)
    if includes is None:
        return raw
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'include' must be a list of YAML files, got {includes!r}")
    merged: dict[str, Any] = {}
    for name in includes:
        part_path = Path(name).expanduser()
        if not part_path.is_file():
            raise ConfigError(f"{path}: include '{name}': no such file (paths are relative to the current directory)")
        if part_path.resolve() in (*seen, path.resolve()):
            raise ConfigError(f"{path}: include '{name}' includes itself (directly or through another file)")
        # Included files may include others (configs/tiny-lora.yaml includes tiny.yaml, which includes the registry).
        _merge(merged, _with_includes(_read_mapping(part_path), part_path, (*seen, path.resolve())))
    _merge(merged, raw)
    return merged


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (saved in every stage's output)."""
    return dataclasses.asdict(cfg)


# transformers.TrainingArguments names -> our keys, for "did you mean" hints.
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_scheduler",
    "model_name_or_path": "name_or_path",
    "max_seq_length": "max_length",
}


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key, type and bound."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            # Match against our keys and the transformers names people type out of habit.
            names = list(known) + [a for a, k in ALIASES.items() if k in known]
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            suggestion = ALIASES.get(close[0], close[0]) if close else None
            hint = f"; did you mean '{prefix}{suggestion}'?" if suggestion else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        if name in raw:
            value = _coerce(hints[name], raw[name], key)
            _check_bounds(f, value, key)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}' ({f.metadata.get('help', '')})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ cross-check
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': {value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"'{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, str):  # `key=value` for a list-valued key on the command line
                value = [value]
            else:
                raise ConfigError(f"'{key}' must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {type(value).__name__} {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(key_tp, k, key): _coerce(value_tp, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept any spelling Python reads as a float.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"'{key}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for '{key}'")  # a bug in this module, not user input


def _check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    meta = f.metadata
    for op, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(f"'{key}' must be {word} {meta[op]}, got {value!r}")


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (`3` int, `1e-4` float, `null`, `[a, b]`)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, help) for every key, for `python -m pipeline keys`."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            rows.append((f"{prefix}{f.name}", "mapping", f.metadata.get("help", "")))
            rows.extend(describe(typing.get_args(tp)[1], f"{prefix}{f.name}.<name>."))
        else:
            rows.append((f"{prefix}{f.name}", _type_name(tp), f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    """`int`, `str | None`, `'cosine' | 'linear'`, `list[str]`: how a key's type reads in `keys`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))



# --------------------------------------------------------------------------------------------- stage help

HELP_WIDTH = 100  # `<stage> --help` fits a 100-column terminal


def stage_help(cfg: Config, stage: str, config_path: str | Path = "", overrides: tuple[str, ...] | list[str] = ()) -> str:
    """`python -m pipeline <stage> --help`: every key the stage reads, grouped by section, with its type,
    its value in `cfg` (the chosen profile after overrides), its bounds and its help, all read from the
    dataclasses above so nothing is written twice."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    stage_field = next(f for f in dataclasses.fields(Config) if f.name == stage)
    lines = [
        f"usage: python -m pipeline {stage} [--config configs/<profile>.yaml] [key=value ...]"
        + (" [--dry-run]" if stage in ("pretrain", "sft", "rm", "ppo") else ""),
        f"       make {stage} PROFILE=<profile> ARGS=\"key=value ...\"",
        "",
        *_wrap(f"{stage}: {_doc(type(getattr(cfg, stage)))}", 0),
        "",
        *_wrap(f"Values are those of profile '{cfg.profile}' ({config_path or 'configs/' + cfg.profile + '.yaml'}"
               + (f" with {' '.join(overrides)}" if overrides else "") + "); 'default x' marks a value that "
               "differs from the built-in default. Override any key as key=value.", 0),
    ]
    # The stage's own section first: what the user came for.
    lines += _section_help(getattr(cfg, stage), stage, stage_field.metadata["help"])
    top = [k for k in STAGE_READS[stage] if "." not in k and not dataclasses.is_dataclass(getattr(cfg, k))]
    if top:
        lines += ["", "shared keys:"]
        lines += _keys_help(cfg, top, "")
    for key in STAGE_READS[stage]:
        if key in top:
            continue
        if "." not in key:  # a whole shared section
            field_ = next(f for f in dataclasses.fields(Config) if f.name == key)
            lines += _section_help(getattr(cfg, key), key, field_.metadata["help"])
    others = [k for k in STAGE_READS[stage] if "." in k]
    if others:
        lines += ["", f"keys of other stages that {stage} reads:"]
        lines += _keys_help(cfg, others, "")
    return "\n".join(lines) + "\n"


def _section_help(obj: Any, prefix: str, title: str) -> list[str]:
    """A section's scalar keys under a heading, then each nested section under its own."""
    fields = dataclasses.fields(obj)
    hints = typing.get_type_hints(type(obj))
    scalars = [f.name for f in fields if not dataclasses.is_dataclass(hints[f.name])]
    lines = ["", f"{prefix}:  {title}"]
    lines += _keys_help(obj, scalars, f"{prefix}.")
    for f in fields:
        if dataclasses.is_dataclass(hints[f.name]):
            lines += _section_help(getattr(obj, f.name), f"{prefix}.{f.name}", f.metadata.get("help", ""))
    return lines


def _keys_help(root: Any, keys: list[str], prefix: str) -> list[str]:
    """Two lines or more per key: `  key = value  type, bounds`, then its help indented below."""
    lines = []
    for key in keys:
        *parents, name = key.split(".")
        owner = root
        for part in parents:
            owner = getattr(owner, part)
        f = next(f for f in dataclasses.fields(owner) if f.name == name)
        tp = typing.get_type_hints(type(owner))[name]
        value = getattr(owner, name)
        spec = _type_name(tp).replace("None", "null")  # as it is typed in YAML
        bounds = [f"{word} {f.metadata[op]:g}" for op, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if op in f.metadata]
        if bounds:
            spec += ", " + " and ".join(bounds)
        default = f.default  # MISSING for sections and required keys
        # An empty default ('' for profile, run_dir) means "derived", which the value already shows.
        if default not in (dataclasses.MISSING, "") and default != value:
            spec += f"; default {_show(default)}"
        lines += _wrap(f"{prefix}{key} = {_show(value)}    [{spec}]", 2, 6)
        lines += _wrap(f.metadata.get("help", ""), 6)
    return lines


def _show(value: Any) -> str:
    """A value as it would be typed in the YAML or as an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value and value[0] not in "[{'\"" else repr(value)
    if isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
        return "{" + ", ".join(value) + "}"  # the registry: its names (`python -m pipeline config` shows each)
    if isinstance(value, dict | list):  # one line, in YAML's flow style
        return yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip()
    return str(value)


def _plain(value: Any) -> Any:
    """Nested dataclasses (e.g. in a mapping-valued key) as plain dicts YAML can write."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _doc(cls: type) -> str:
    """A class's own docstring; dataclass makes one up from the signature when it has none."""
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())


def _wrap(text: str, indent: int, subsequent: int | None = None) -> list[str]:
    return textwrap.wrap(text, HELP_WIDTH, initial_indent=" " * indent,
                         subsequent_indent=" " * (indent if subsequent is None else subsequent),
                         break_on_hyphens=False, break_long_words=False) or []
