"""LoRA and QLoRA (peft, bitsandbytes): adapters for sft, rm and ppo, merged outputs, and PPO on one base model.

A stage with `<stage>.lora.r > 0` trains a peft LoRA adapter instead of the whole model; with
`model.load_in_4bit` (QLoRA) or `load_in_8bit` the frozen base it sits on is quantized by bitsandbytes.
Its output directory holds both forms, so the next stage and any user load it as before:
  - `adapter/`: the adapter in peft's format (`PeftModel.from_pretrained(base, "<stage>/adapter")`);
  - the merged model at the top level, merged into a full-precision copy of the base (never into 4-bit
    weights, whose rounding would change the merged model): `from_pretrained("<stage>")` gives the trained model.

PPO with LoRA keeps one base model in memory (`SharedBase`): the SFT model with three adapters,
  - `default`: the policy (trained);
  - `value`: the value model's adapter (trained) and a scalar head, both initialised from the reward model
    when it is a LoRA reward model of the same SFT model (InstructGPT initialises the value model from the
    RM), else a fresh adapter and the RM's head;
  - `reward`: the reward model's adapter and head (frozen), when rm was trained with rm.lora from the same base;
and the KL reference is the same module with every adapter switched off, which gives the SFT model's logits
exactly. Another reward model (full fine-tuning) is loaded on its own, frozen (4-bit under QLoRA).

The value model is a second adapter on the policy's base rather than the RM's own base with an adapter: the
RM's base *is* the SFT base plus its adapter, so the one base serves all four roles.

Adapters are switched with `use_adapter`, which sets peft's active-adapter flags on every LoRA layer without
touching `requires_grad` (peft's own `set_adapter` and `disable_adapter` re-enable gradients on whatever they
activate, which would make the frozen reward adapter trainable).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.config import Config, ConfigError, LoRAConfig
from pipeline.distributed import submodule_state_dict, without_zero3_init
from pipeline.modeling import DTYPES, causal_lm_logits

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # a LoRA stage's adapter, in peft's format, inside its output directory
POLICY, VALUE, REWARD = "default", "value", "reward"  # the adapters of PPO's shared base


# ------------------------------------------------------------------------------------------------- building


def quantization_config(cfg: Config) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings for QLoRA (4-bit NF4, double quantization) or LLM.int8, or None for full precision."""
    model_cfg = cfg.model
    if model_cfg.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=DTYPES[model_cfg.bnb_4bit_compute_dtype],
        )
    if model_cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_quantization(cfg: Config, lora: LoRAConfig, stage: str) -> None:
    """A quantized model cannot be fine-tuned in full: quantization needs the stage's adapter."""
    model_cfg = cfg.model
    if (model_cfg.load_in_4bit or model_cfg.load_in_8bit) and not lora.enabled:
        bits = "4" if model_cfg.load_in_4bit else "8"
        raise ConfigError(f"model.load_in_{bits}bit trains an adapter on a frozen quantized base: set {stage}.lora.r "
                          f"(e.g. {stage}.lora.r=16), or turn model.load_in_{bits}bit off for full fine-tuning")


def peft_config(cfg: LoRAConfig, task: str) -> LoraConfig:
    """peft's LoraConfig from ours. `task` is CAUSAL_LM or SEQ_CLS (the latter trains the scalar head in full)."""
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules or "all-linear",  # all-linear leaves the output head out
        modules_to_save=list(cfg.modules_to_save) or None,  # SEQ_CLS adds the `score` head itself
        task_type=task,
        bias="none",
        # A tied model (GPT-2, Qwen2.5-0.5B) keeps its input embedding and output head one trained matrix when
        # modules_to_save names either (`tied_modules_to_save` adds the other); peft unties them otherwise.
        ensure_weight_tying=True,
    )


def tied_modules_to_save(model: PreTrainedModel, cfg: LoRAConfig) -> LoRAConfig:
    """`cfg` with the tied partner added when modules_to_save names a tied model's input embedding or its output
    head: training one copy alone would untie them (the head frozen while the embedding trains)."""
    if not cfg.modules_to_save or not getattr(model.config, "tie_word_embeddings", False):
        return cfg
    out = model.get_output_embeddings()
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    pair = {names.get(model.get_input_embeddings()), names.get(out) if out is not None else None} - {None}
    wanted = set(cfg.modules_to_save)
    if len(pair) != 2 or not wanted & pair or pair <= wanted:
        return cfg
    return replace(cfg, modules_to_save=[*cfg.modules_to_save, *sorted(pair - wanted)])


def wrap(model: PreTrainedModel, cfg: LoRAConfig, task: str, gradient_checkpointing: bool = False) -> PeftModel:
    """`model` with a fresh trainable LoRA adapter; the base frozen. A quantized base is first prepared for
    k-bit training (norms in float32, input gradients on), as QLoRA does."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_trainable_4bit_layout(model)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry gradients through checkpoints
    cfg = tied_modules_to_save(model, cfg) if task == "CAUSAL_LM" else cfg
    wrapped = get_peft_model(model, peft_config(cfg, task))
    trainable, total = wrapped.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %d modules: %s trainable of %s parameters (%.2f%%)", cfg.r, len(wrapped.peft_config["default"].
             target_modules), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return wrapped


def keep_trainable_4bit_layout(model: torch.nn.Module) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights for a faster inference kernel on the first
    eval-mode forward and never unpacks them: a training forward after that (sft measures the model before it
    trains) fails inside its matmul, and the repacked kernel rounds differently. Training keeps the plain layout."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------------------------------------- switching


def _switchable(model: torch.nn.Module) -> list[torch.nn.Module]:
    # LoRA layers and modules_to_save wrappers both keep these two flags.
    return [m for m in model.modules() if hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")]


ACTIVE = "_pipeline_active_adapter"  # which role `use_adapter` runs, read again by a checkpoint's recomputation


@contextmanager
def use_adapter(model: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Within the block, only adapter `name` is active (None: none, the base model alone); gradients untouched."""
    layers = model.__dict__.get("_pipeline_switchable")
    if layers is None:  # the module tree does not change after setup: find the switchable layers once
        layers = model.__dict__["_pipeline_switchable"] = _switchable(model)
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    saved_name = model.__dict__.get(ACTIVE, POLICY)
    model.__dict__[ACTIVE] = name
    try:
        for m in layers:
            if name is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [name]
                m._disable_adapters = False
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved, strict=True):
            m._active_adapter, m._disable_adapters = active, disabled
        model.__dict__[ACTIVE] = saved_name


# ------------------------------------------------------------------------------------------------- saving


def save_adapter(model: PeftModel, directory: Path, adapter: str = "default",
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter `adapter` in peft's format (adapter_config.json + adapter_model.safetensors) in `directory`.

    `state_dict` is the full model's (gathered under ZeRO-3); peft keeps the adapter's entries."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    model.peft_config[adapter].save_pretrained(str(directory))


def merged_model(base_path: str | Path, adapter_dir: Path, model_cls: type, dtype: str = "float32",
                 vocab_size: int | None = None, **kwargs: Any) -> PreTrainedModel:
    """The adapter merged into a full-precision copy of its base (never into 4-bit weights), a plain model.
    `dtype` is model.dtype (float32, or bfloat16 for big models: the copy is made on the CPU)."""
    with without_zero3_init():  # runs on the main process alone
        base = model_cls.from_pretrained(str(base_path), dtype=DTYPES[dtype], **kwargs)
    if vocab_size is not None and base.get_input_embeddings().num_embeddings != vocab_size:
        base.resize_token_embeddings(vocab_size)  # e.g. the reward model's added pad token
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.task_type = None  # a plain PeftModel: a causal-LM adapter merges into a sequence classifier too
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    merged = PeftModel.from_pretrained(base, str(adapter_dir), config=config).merge_and_unload()
    _retie(merged, tied)
    return merged


def _retie(model: PreTrainedModel, tied: bool) -> None:
    """peft unties a tied model when it merges a trained copy of its embedding (modules_to_save) and says so in the
    config; the embedding and the head trained as one matrix (`tied_modules_to_save`), so one copy is kept and
    the model stays tied, as its base was."""
    if not tied or getattr(model.config, "tie_word_embeddings", False):
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None:  # a sequence classifier has no head to tie: only the flag changed
        model.config.tie_word_embeddings = True
    elif torch.equal(out.weight, inp.weight):
        out.weight = inp.weight
        model.config.tie_word_embeddings = True


# ------------------------------------------------------------------------------------------------- PPO


class AdapterView:
    """One role of the shared base (policy or reference) as a causal LM: calls go through with `adapter` active.

    Not an nn.Module on purpose: it holds no parameters of its own, so nothing is registered twice."""

    def __init__(self, shared: SharedBase, adapter: str | None):
        self._shared, self._adapter = shared, adapter

    @property
    def config(self) -> Any:
        return self._shared.base.config

    def __call__(self, **kwargs: Any) -> Any:
        with use_adapter(self._shared.base, self._adapter):
            return self._shared.base(**kwargs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        with use_adapter(self._shared.base, self._adapter):
            return self._shared.base.generate(**kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._shared.base.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self._shared.base.get_output_embeddings()

    def get_base_model(self) -> torch.nn.Module:  # the transformers model `generate` runs (its forward hooks)
        return self._shared.base.get_base_model()

    # Train/eval mode is the shared module's: every role of the base switches together.
    @property
    def training(self) -> bool:
        return self._shared.training

    def train(self, mode: bool = True) -> AdapterView:
        self._shared.train(mode)
        return self

    def eval(self) -> AdapterView:
        return self.train(False)


class ScoringView:
    """The value or reward role of the shared base: the backbone with `adapter` active, then its scalar head."""

    def __init__(self, shared: SharedBase, adapter: str, head: torch.nn.Linear, shift: float = 0.0):
        self._shared, self._adapter, self.head, self.shift = shared, adapter, head, shift

    @property
    def config(self) -> Any:
        return self._shared.base.config

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] the head at every position (see `pipeline.modeling.token_scores`)."""
        with use_adapter(self._shared.base, self._adapter):
            hidden = self._shared.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float() - self.shift


class SharedBase(torch.nn.Module):
    """PPO's models on one base: policy (`default` adapter), value (`value` adapter + head), reward (`reward`
    adapter + head, frozen, when the RM is a LoRA model of the same base) and reference (no adapter)."""

    def __init__(self, base: PeftModel, value_head: torch.nn.Linear, reward_head: torch.nn.Linear | None,
                 reward_shift: float):
        super().__init__()
        self.base = base
        self.value_head = value_head
        self.reward_head = reward_head
        self.reward_shift = reward_shift

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                ptx_input_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                logits_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What `pipeline.rollout.PolicyAndValue` returns: policy logits (the last `logits_to_keep` positions, or at
        the flat positions `logits_index`; neither: all), values, ptx logits; one module for `accelerator.prepare`,
        so one backward syncs both trained adapters."""
        logits = causal_lm_logits(self.policy, input_ids, attention_mask, position_ids, logits_to_keep,
                                  logits_index)
        values = self.value_model.token_scores(input_ids, attention_mask, position_ids)
        ptx_logits = None
        if ptx_input_ids is not None:
            ptx_logits = self.policy(input_ids=ptx_input_ids, use_cache=False).logits
        return logits, values, ptx_logits

    # Activation checkpointing with adapters switched inside one forward: a checkpointed layer is recomputed
    # during the backward pass, after `use_adapter` has restored the flags, so the recomputation would run with
    # the wrong adapter and give wrong gradients. torch's `context_fn` wraps each recomputation in a context of
    # our choosing: the adapter that was active when that layer ran forward.
    @property
    def is_gradient_checkpointing(self) -> bool:  # what TRL's `unwrap_model_for_generation` asks
        inner = self.base.get_base_model()
        return bool(getattr(inner, "is_activation_checkpointing", getattr(inner, "is_gradient_checkpointing", False)))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        base = self.base

        def context_fn() -> tuple[Any, Any]:
            return nullcontext(), use_adapter(base, base.__dict__.get(ACTIVE, POLICY))

        base.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})

    def gradient_checkpointing_disable(self) -> None:
        self.base.get_base_model().gradient_checkpointing_disable()

    @property
    def backbone(self) -> torch.nn.Module:
        inner = self.base.get_base_model()
        return getattr(inner, inner.base_model_prefix)

    @property
    def policy(self) -> AdapterView:
        return AdapterView(self, POLICY)

    @property
    def reference(self) -> AdapterView:
        return AdapterView(self, None)

    @property
    def value_model(self) -> ScoringView:
        return ScoringView(self, VALUE, self.value_head)

    @property
    def reward_model(self) -> ScoringView | None:
        if self.reward_head is None:
            return None
        return ScoringView(self, REWARD, self.reward_head, self.reward_shift)


def rm_adapter(rm_path: str | Path, sft_path: str | Path) -> Path | None:
    """The reward model's adapter when it was trained with rm.lora on `sft_path`: it then fits the shared base."""
    adapter = Path(rm_path) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return None
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base is None or Path(base).resolve() != Path(sft_path).resolve():
        log.info("ppo: the reward model's adapter was trained on %s, not on the policy's base %s: the merged reward "
                 "model is loaded as a separate frozen model", base, sft_path)
        return None
    return adapter


def _split_head(weights: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A sequence-classification adapter's LoRA weights and its trained scalar head (`score`)."""
    head = [k for k in weights if k.endswith("score.weight")]
    if len(head) != 1:
        raise ConfigError(f"{where}: a reward model's adapter needs one scalar head 'score' (found {head or 'none'})")
    return {k: v for k, v in weights.items() if "lora_" in k}, weights[head[0]]


def build_shared_base(base: PreTrainedModel, cfg: LoRAConfig, gradient_checkpointing: bool,
                      rm_adapter_dir: Path | None, rm_head: torch.Tensor | None, rm_shift: float) -> SharedBase:
    """PPO's one-base module. `base` is the SFT model (quantized or not); it gets the policy adapter (fresh), and
    - with `rm_adapter_dir` (a LoRA reward model of the same base): the frozen `reward` adapter and head from it,
      and the `value` adapter and head initialised from it (InstructGPT initialises the value model from the RM);
    - else: a fresh `value` adapter and the separate reward model's head `rm_head` ([1, hidden]).
    `rm_shift` is the reward model's normalization, subtracted from the reward adapter's score."""
    cfg = tied_modules_to_save(base, cfg)
    model = wrap(base, cfg, "CAUSAL_LM")  # checkpointing is enabled below, adapter-aware
    reward_head = None
    if rm_adapter_dir is not None:
        rm_lora = LoraConfig.from_pretrained(str(rm_adapter_dir))
        rm_lora.modules_to_save = None  # the head lives in SharedBase, not in the causal LM
        rm_lora.task_type = "CAUSAL_LM"
        weights, rm_head = _split_head(load_peft_weights(str(rm_adapter_dir), device="cpu"), rm_adapter_dir)
        for name in (VALUE, REWARD):
            model.add_adapter(name, rm_lora)
            result = set_peft_model_state_dict(model, weights, adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
            if missing:
                raise ConfigError(f"{rm_adapter_dir}: the reward model's adapter does not fit the policy's base "
                                  f"(no weights for {missing[0]})")
        reward_head = _head(rm_head, base, trainable=False)
    else:
        model.add_adapter(VALUE, peft_config(cfg, "CAUSAL_LM"))
    if rm_head is None:
        raise ValueError("build_shared_base needs the reward model's head or its adapter")
    # Gradients: the policy and value adapters train, the reward adapter never (add_adapter and peft's own
    # switching set requires_grad by which adapter is active; here it is set once, by role).
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            param.requires_grad_(f".{REWARD}." not in name)
    shared = SharedBase(model, _head(rm_head, base, trainable=True), reward_head, rm_shift)
    if gradient_checkpointing:
        shared.gradient_checkpointing_enable()
    return shared


def _head(weight: torch.Tensor, base: PreTrainedModel, trainable: bool) -> torch.nn.Linear:
    """A bias-free scalar head [hidden -> 1] holding `weight`, in the base's compute dtype."""
    emb = base.get_input_embeddings().weight
    head = torch.nn.Linear(weight.shape[-1], 1, bias=False, device=emb.device,
                           dtype=emb.dtype if emb.dtype.is_floating_point else torch.float32)
    with torch.no_grad():
        head.weight.copy_(weight.reshape(1, -1))
    return head.requires_grad_(trainable)


def reward_shift(rm_path: str | Path) -> float:
    """A LoRA reward model's normalization shift, from its summary (its merged model has it in the weights; its
    adapter does not)."""
    summary = Path(rm_path) / "summary.json"
    if not summary.is_file():
        return 0.0
    return float(json.loads(summary.read_text()).get("normalization", {}).get("shift") or 0.0)


# ------------------------------------------------------------------------------------------------- merging


def merge_causal_lm(base_path: str | Path, adapter_dir: Path, dtype: str) -> PreTrainedModel:
    """A causal-LM stage's output: its adapter merged into a full-precision copy of its base."""
    return merged_model(base_path, adapter_dir, AutoModelForCausalLM, dtype)


def merge_reward_model(base_path: str | Path, adapter_dir: Path, dtype: str, vocab_size: int,
                       pad_token_id: int) -> PreTrainedModel:
    """A reward model's output: adapter and trained head merged into a full-precision sequence-classification
    copy of its base (with the pad token the reward model added, if any)."""
    merged = merged_model(base_path, adapter_dir, AutoModelForSequenceClassification, dtype, vocab_size=vocab_size,
                          num_labels=1)
    merged.config.pad_token_id = pad_token_id
    return merged


def save_ppo(shared: SharedBase, state_dict: dict[str, torch.Tensor], staging: Path, init: str, dtype: str,
             tokenizer: PreTrainedTokenizerBase, value_tokenizer: PreTrainedTokenizerBase) -> None:
    """PPO's LoRA policy as its adapter (adapter/) and merged into a full-precision copy of the SFT model (the
    stage directory itself); the value model likewise under value_model/ (a sequence-classification model)."""
    weights = submodule_state_dict(state_dict, "base", shared.base)
    save_adapter(shared.base, staging / ADAPTER_DIR, POLICY, weights)
    merge_causal_lm(init, staging / ADAPTER_DIR, dtype).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    value_dir = staging / "value_model"
    save_adapter(shared.base, value_dir / ADAPTER_DIR, VALUE, weights)
    value = merge_reward_model(init, value_dir / ADAPTER_DIR, dtype, len(value_tokenizer),
                                    value_tokenizer.pad_token_id)
    with torch.no_grad():
        value.score.weight.copy_(state_dict["value_head.weight"].to(value.score.weight.dtype))
    value.save_pretrained(value_dir)
    value_tokenizer.save_pretrained(value_dir)
