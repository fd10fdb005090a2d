"""Model and tokenizer loading: a hub id or local directory, or the tiny GPT-2 built from scratch.

Two ways in:
- `model.name_or_path` set (e.g. `gpt2`, or a directory written by `save_pretrained`): the real
  `from_pretrained` path, exactly what a user with a hub model runs.
- `model.name_or_path: null`: the tiny profile. A byte-level BPE tokenizer is trained on the shipped
  corpus and a few-layer GPT-2 is initialised from scratch, so the whole pipeline runs offline on a CPU.

Either way the tokenizer leaves here with a pad token distinct from nothing (EOS when the model has no
pad token of its own) and a chat template with `{% generation %}` markers, so conversational SFT data
can be trained on assistant turns only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.activations import GELUTanh, NewGELUActivation

from pipeline.config import ConfigError, DatasetConfig, ModelConfig, TokenizerConfig
from pipeline.data import load_corpus
from pipeline.distributed import gathered_params, inner

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# A minimal chat template for models that ship none (the tiny model, GPT-2). The assistant's content and
# its EOS sit inside {% generation %} so TRL's assistant-only loss trains the model to stop; the prompt
# rendered with add_generation_prompt=True is a prefix of the full conversation, which TRL requires.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be found or loaded; the message says what to do."""


def build_tiny_tokenizer(
    cfg: TokenizerConfig, registry: Mapping[str, DatasetConfig] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on the corpus named by `tokenizer.train_data` (a path, hub
    id, or registry name)."""
    corpus = load_corpus(cfg.train_data, registry=registry)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(corpus["text"], trainer=trainer, length=len(corpus))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """A GPT-2 initialised from scratch, its embedding sized to the tokenizer (max id + 1)."""
    vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.tiny.n_positions,
        n_embd=cfg.tiny.n_embd,
        n_layer=cfg.tiny.n_layer,
        n_head=cfg.tiny.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=cfg.tiny.dropout,
        embd_pdrop=cfg.tiny.dropout,
        attn_pdrop=cfg.tiny.dropout,
    )
    model = GPT2LMHeadModel(config)
    _sync_generation_config(model, tokenizer)
    return fuse_activations(model)


def fuse_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Swap transformers' `NewGELUActivation` (GPT-2's `gelu_new`: the tanh GELU as eight elementwise ops, each
    with its own pass over memory and its own saved tensor for backward) for `GELUTanh`, torch's one-kernel
    GELU with the tanh approximation: the same function within float rounding, about a fifth less time for a
    tiny GPT-2's forward and backward on a CPU (docs/performance.md). Only the modules change, not
    `config.activation_function`, so saved checkpoints are as before and load anywhere."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    return model


def load_tokenizer(name_or_path: str, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` with a pad token and a chat template guaranteed."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                                  trust_remote_code=_remote_code(name_or_path, trust_remote_code))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer '{name_or_path}': {_first_line(e)}{_remote_code_hint(e)}") from None
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        # GPT-2 and many base models have no pad token; EOS is the standard stand-in. Every loss here masks
        # padding through the attention mask, so the stand-in never trains the model to stop early.
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(
    name_or_path: str, dtype: str = "float32", revision: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None, make_target: str | None = None,
    quantization: BitsAndBytesConfig | None = None, trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM from a hub id or a local Hugging Face directory, with its own tokenizer or `tokenizer`.
    `make_target` builds the directory (named when its weights are corrupted); `quantization` loads the weights
    in 4 or 8 bits (QLoRA's frozen base, see pipeline/lora.py). Weights load from safetensors only (see
    `_require_safetensors`)."""
    _require_safetensors(name_or_path, make_target)
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path, revision, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], revision=revision,
                                                     use_safetensors=True, **_quantized(quantization),
                                                     trust_remote_code=_remote_code(name_or_path, trust_remote_code))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model '{name_or_path}': {_first_line(e)}{_remote_code_hint(e)}") from None
    except SafetensorError as e:
        raise ModelLoadError(_corrupt_weights(name_or_path, e, make_target)) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # a tokenizer with added tokens
    _sync_generation_config(model, tokenizer)
    return fuse_activations(model), tokenizer


def load_base(
    model_cfg: ModelConfig, tok_cfg: TokenizerConfig, registry: Mapping[str, DatasetConfig] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The pipeline's starting point: the configured hub/local model, or a fresh tiny GPT-2."""
    tokenizer = load_base_tokenizer(model_cfg, tok_cfg, registry)
    if model_cfg.name_or_path is None:
        model = build_tiny_model(model_cfg, tokenizer)
        log.info("built tiny GPT-2: %.2fM parameters, vocab %d", model.num_parameters() / 1e6, len(tokenizer))
        return model, tokenizer
    return load_causal_lm(model_cfg.name_or_path, model_cfg.dtype, model_cfg.revision, tokenizer,
                          trust_remote_code=model_cfg.trust_remote_code)


def load_base_tokenizer(
    model_cfg: ModelConfig, tok_cfg: TokenizerConfig, registry: Mapping[str, DatasetConfig] | None = None
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer alone (what `load_base` pairs with the model; the dry run uses it alone):
    `tokenizer.name_or_path`, else the model's own, else the tiny BPE trained in memory on `tokenizer.train_data`."""
    if tok_cfg.name_or_path:
        return load_tokenizer(tok_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.name_or_path is None:
        return build_tiny_tokenizer(tok_cfg, registry)
    return load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)


def load_stage_model(
    path: str | Path, make_target: str | None = None, quantization: BitsAndBytesConfig | None = None,
    dtype: str = "float32", trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a previous stage's output, with an error that says which `make` target builds it."""
    _require_finished(path, make_target)
    return load_causal_lm(str(path), dtype=dtype, make_target=make_target, quantization=quantization,
                          trust_remote_code=trust_remote_code)


def _quantized(quantization: BitsAndBytesConfig | None) -> dict[str, Any]:
    """`from_pretrained` arguments for a bitsandbytes-quantized load: on the process's own GPU, or the CPU."""
    if quantization is None:
        return {}
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


# Pickle-based weight files: unpickling one can run any code it names, so none is ever read.
PICKLED_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _require_safetensors(path: str | Path, make_target: str | None) -> None:
    """A local directory must hold its weights as safetensors: one with only pickled weights (a
    `pytorch_model.bin`) is refused before anything reads it, since loading a pickle can execute code."""
    p = Path(path)
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return
    pickled = sorted({f.name for pattern in PICKLED_WEIGHTS for f in p.glob(pattern)})
    if pickled:
        how = f"rebuild it with `make {make_target}`" if make_target else (
            "convert it once, where you trust the file, with `AutoModel.from_pretrained(dir).save_pretrained(dir)` "
            "(transformers writes safetensors)")
        raise ModelLoadError(f"{p} holds only pickled weights ({', '.join(pickled)}), which can run code when "
                             f"loaded; this pipeline reads safetensors only: {how}")


def _remote_code_hint(error: BaseException) -> str:
    """What to do when transformers refused a model that needs its own code (trust_remote_code off)."""
    if "trust_remote_code" in str(error) or "contains custom code" in str(error):
        return (" (its config names Python code of its own, which runs only with `model.trust_remote_code: true` "
                "in the profile: set it if you trust that code)")
    return ""


def _remote_code(name_or_path: str | Path, trust: bool) -> bool:
    """`trust_remote_code` for a load, with the warning that names the model whose code may now run."""
    if trust:
        log.warning("model.trust_remote_code is on: Python code shipped with '%s' may run", name_or_path)
    return trust


def _require_finished(path: str | Path, make_target: str | None) -> None:
    """A local path (not a hub id) must hold a finished model; say which `make` target builds it."""
    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith((".", "runs/")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        how = f": build it with `make {make_target}`" if make_target else ""
        partial = p.with_name(p.name + ".partial")
        if partial.is_dir():  # the stage was started but never finished (interrupted, failed, or still running)
            how = (f": {partial} holds a run that never finished; "
                   + (f"`make {make_target}` resumes it" if make_target else "run its stage again to resume it"))
        raise ModelLoadError(f"no finished model at {p}{how}")


def _corrupt_weights(path: str | Path, error: Exception, make_target: str | None) -> str:
    """The message for weights safetensors cannot read (a truncated copy, a disk that filled up): which file."""
    bad = None
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except SafetensorError:
            bad = f
            break
    how = f"rebuild it with `make {make_target}`" if make_target else "rebuild or copy it again"
    return f"{bad or path}: corrupted or truncated weights file ({error}); {how}"


def load_reward_model(
    path: str | Path, make_target: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
    quantization: BitsAndBytesConfig | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output (the reward) from a causal-LM or reward-model directory.

    Starting from an SFT checkpoint, transformers drops the LM head and initialises a fresh scalar `score`
    head; starting from a finished reward model, it loads the trained head. The reward is read at the last
    non-padding token, which transformers finds by comparing ids with `config.pad_token_id`: the pad token
    must therefore differ from EOS, or the EOS that ends every scored completion would count as padding.
    """
    _require_finished(path, make_target)
    _require_safetensors(path, make_target)
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=DTYPES[dtype], use_safetensors=True, **_quantized(quantization),
            trust_remote_code=_remote_code(path, trust_remote_code))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load reward model '{path}': {_first_line(e)}{_remote_code_hint(e)}") from None
    except SafetensorError as e:
        raise ModelLoadError(_corrupt_weights(path, e, make_target)) from None
    ensure_distinct_pad(model, tokenizer)
    return fuse_activations(model), tokenizer


def load_reward_model_tokenizer(path: str | Path, make_target: str | None = None,
                                trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_reward_model` pairs with the reward model at `path`, without loading the model."""
    _require_finished(path, make_target)
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    distinct_pad_token(tokenizer)
    return tokenizer


def ensure_distinct_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token of its own (adding `<|pad|>` when it pads with EOS) and tell the model."""
    distinct_pad_token(tokenizer)
    if tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def distinct_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer half of `ensure_distinct_pad`: add `<|pad|>` when the tokenizer pads with EOS."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
        log.info("added pad token %s (id %d): rewards are read at the EOS, so EOS cannot pad", PAD,
                 tokenizer.pad_token_id)


def shift_reward(model: PreTrainedModel, shift: float) -> str:
    """Subtract `shift` from every reward the model outputs, inside its own weights; return how.

    InstructGPT normalizes the RM with a bias before RL. When the scalar head has a bias it takes the shift.
    GPT-2-style heads have none, but the final LayerNorm's bias feeds only the head: moving it by
    δ = −shift · w / ‖w‖² moves every reward by w·δ = −shift exactly, and a plain `from_pretrained` of the
    saved directory returns the normalized reward. Models with neither (RMSNorm, no head bias) keep the shift
    in `config.reward_shift`, which this project's loaders subtract; the summary says which happened.
    """
    head = model.score
    if model.config.num_labels != 1:
        raise ValueError("shift_reward expects a scalar reward head (num_labels = 1)")
    norm = next((getattr(model.base_model, n) for n in ("ln_f", "norm", "final_layer_norm")
                 if getattr(getattr(model.base_model, n, None), "bias", None) is not None), None)
    # Under ZeRO-3 the head and the norm may be partitioned: gather them, change them everywhere.
    with torch.no_grad(), gathered_params([head.weight, head.bias, norm.bias if norm is not None else None]):
        if head.bias is not None:
            head.bias -= shift
            return "head_bias"
        if norm is not None:
            w = head.weight[0].float()
            norm.bias += (-shift * w / w.pow(2).sum()).to(norm.bias.dtype)
            return "final_norm_bias"
    model.config.reward_shift = getattr(model.config, "reward_shift", 0.0) + shift
    return "config.reward_shift"


def compute_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards of right-padded sequences, each read at its last non-padding token (its EOS).

    `model` may be wrapped (DDP, FSDP, DeepSpeed): the forward goes through the wrapper so gradients sync.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)
    config = getattr(model, "module", model).config
    return logits - getattr(config, "reward_shift", 0.0)


def token_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T] the scalar head of a reward (or value) model applied at every position, shift included.

    PPO needs what `compute_rewards` pools away: a value at every completion token, and the reward read at
    a position it chooses (the last real token of a left-padded prompt + right-padded completion, whatever
    the pad id). So this runs the backbone and the `score` head directly. Calling it on an unwrapped
    model skips DDP's gradient hooks: wrap it in a module that goes through `accelerator.prepare` to train.
    """
    if hasattr(model, "token_scores"):  # a role of PPO's shared LoRA base (pipeline.lora.ScoringView)
        return model.token_scores(input_ids, attention_mask, position_ids)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    scores = model.score(hidden).squeeze(-1).float()
    return scores - getattr(model.config, "reward_shift", 0.0)


def causal_lm_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, keep: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
    """A causal LM's logits where PPO reads them, and nowhere else: the LM head and everything after it
    (log-softmax over the vocabulary, its backward) skip the positions PPO never scores, the prompt first.

    `keep` > 0: [B, keep, V] at the last `keep` positions (transformers' own `logits_to_keep`, which generation
    uses; a model that ignores it returns every position, cut here). `index`: [*index.shape, V] at the flattened
    positions `index` of [B, T] (packed rows, `pipeline.packing`): the hidden states are gathered right before
    the output embedding (a pre-hook), so whatever the model applies after it (a logit scale or soft-cap) still
    applies. Neither: every position."""
    head = _output_head(model) if index is not None else None
    if index is not None and head is None:  # a wrapper that hides its head: every position, then gathered
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])[index]
    handle = None
    if head is not None:
        def gather(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            hidden = args[0]
            return (hidden.reshape(-1, hidden.shape[-1])[index], *args[1:])

        handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, logits_to_keep=keep).logits
    finally:
        if handle is not None:
            handle.remove()
    if index is not None:
        if logits.shape[:-1] != index.shape:
            raise RuntimeError(f"{type(model).__name__} reshaped its logits after the output embedding "
                               f"({tuple(logits.shape)} for positions {tuple(index.shape)})")
        return logits
    return logits[:, -keep:]


def _output_head(model: Any) -> torch.nn.Module | None:
    """The module that maps hidden states to logits (GPT-2's `lm_head`), through a DeepSpeed / DDP wrapper."""
    getter = getattr(inner(model), "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return head if isinstance(head, torch.nn.Module) else None


@contextmanager
def plain_sampling(model: Any) -> Iterator[None]:
    """`generate` samples from the model's own distribution, at the temperature / top-k / top-p the call passes,
    and nothing else. A checkpoint's generation_config.json may ship sampling defaults (Qwen2.5-Instruct's
    repetition_penalty 1.1, top_k 20, top_p 0.8, temperature 0.7) that `generate` applies to every setting a call
    leaves unset: PPO's samples must come from the distribution its ratio scores, and evaluation samples from
    the policy being measured. The model's own config is back afterwards (it is saved with the checkpoint)."""
    generating = transformers_model(model)
    saved = getattr(generating, "generation_config", None)
    if saved is None:
        yield
        return
    generating.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
                                                    pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        generating.generation_config = saved


def transformers_model(model: Any) -> torch.nn.Module:
    """The transformers model whose `generate` loop runs (its generation_config, its forward hooks): inside a
    peft model (or a role of PPO's shared LoRA base), the model itself otherwise."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_same_tokenizer(
    policy_tokenizer: PreTrainedTokenizerBase, policy_path: str, other: PreTrainedTokenizerBase, other_path: str,
    key: str, noun: str, make_target: str | None,
) -> None:
    """The reward and value models read the policy's token ids as they are: they must have been trained on the
    same tokenizer (the reward model may add a pad token of its own). An embedding of the same size says nothing:
    another tokenizer with as many tokens gives the same ids other meanings, and the rewards would be noise."""
    theirs = other.get_vocab()
    for token, i in sorted(policy_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if theirs.get(token) != i:
            where = "missing from" if token not in theirs else f"id {theirs[token]} in"
            how = f"rebuild it from this SFT model: `make {make_target}`" if make_target else (
                "train it from the policy's SFT model (rm.init), or point it at one that was")
            raise ConfigError(
                f"'{key}' ({other_path}) was trained with another tokenizer than the policy ({policy_path}): token "
                f"{token!r} is id {i} in the policy's tokenizer but {where} {noun}'s; {how}"
            )


def context_length(model: PreTrainedModel | PretrainedConfig) -> int | None:
    """How many positions the model can attend over (GPT-2 `n_positions`, most others `max_position_embeddings`).

    Takes a model or only its config (the dry run reads `config.json`, never the weights)."""
    config = model if isinstance(model, PretrainedConfig) else model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _sync_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # generate() must stop at our EOS and pad with our pad token, whatever the checkpoint had.
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
