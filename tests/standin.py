"""Local stand-ins for the modern chat models of the shipped profiles, and data files in their hub sets' shapes.

The profiles configs/qwen2.5-0.5b.yaml and configs/llama3-8b-*.yaml name hub models and hub data sets that
cannot be downloaded here. Their code paths are tested on a directory written by `save_pretrained` that holds
what matters of the real thing at a tiny size, built from random weights:

- the architecture class (Qwen2ForCausalLM, LlamaForCausalLM: RoPE, no learned positions, RMSNorm without
  bias, grouped-query attention), with the real model's embedding tying (Qwen2.5-0.5B ties input and output
  embeddings, Llama-3-8B does not);
- a byte-level BPE tokenizer with the family's special tokens in their roles: Qwen2.5-Instruct's EOS is
  `<|im_end|>` and it pads with `<|endoftext|>`; Llama-3-Instruct's EOS is `<|eot_id|>`, its tokenizer adds
  `<|begin_of_text|>` itself and has NO pad token;
- the family's chat template, the exact string the model repository ships (the copies TRL keeps to recognise
  them): Qwen2.5's with its default system prompt, Llama 3's. Neither has `{% generation %}` markers.

The data writers produce rows with the fields and nesting of the hub sets the profiles name
(HuggingFaceH4/ultrachat_200k, openbmb/UltraFeedback, HuggingFaceFW/fineweb-edu), so the registry entries'
column maps are what reads them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl.chat_template_utils import llama3_chat_template, qwen2_5_chat_template

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

_WORDS = (
    "the", "model", "writes", "a", "short", "answer", "about", "cats", "dogs", "rivers", "numbers",
    "colours", "music", "cooking", "travel", "weather", "history", "science", "planets", "gardens",
    "books", "trains", "why", "how", "what", "which", "when", "please", "explain", "list", "name", "give",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "yes", "no", "good",
    "better", "best", "because", "so", "and", "or", "but",
)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _bpe(corpus: list[str], special: tuple[str, ...], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [_sentence(rng, rng.randint(4, 14)) for _ in range(400)]


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2.5-Instruct-style tokenizer: EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS, Qwen2.5's template."""
    tok = _bpe(_corpus(), QWEN_SPECIAL, 400)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(QWEN_SPECIAL[1:]), model_max_length=32768)
    fast.chat_template = qwen2_5_chat_template
    return fast


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-3-Instruct-style tokenizer: BOS `<|begin_of_text|>` added by the tokenizer itself, EOS
    `<|eot_id|>`, no pad token, Llama 3's template."""
    tok = _bpe(_corpus(1), LLAMA_SPECIAL, 400)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([  # as in Meta's tokenizer.json: BOS first, then byte-level offsets
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   additional_special_tokens=list(LLAMA_SPECIAL[1:]), model_max_length=8192)
    fast.chat_template = llama3_chat_template
    assert fast.pad_token is None
    return fast


# A model initialised at the usual scale (0.02) attends almost uniformly and its outputs hardly depend on the
# context: a test of what padding or masking changes wants a larger `initializer_range`, so that they do.


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, generation: GenerationConfig,
          path: Path) -> Path:
    model.generation_config = generation
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_qwen2(path: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A random Qwen2ForCausalLM (tied embeddings, like Qwen2.5-0.5B) and its tokenizer, saved to `path`."""
    import torch

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1000000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6, initializer_range=initializer_range, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
    )
    gen = GenerationConfig(bos_token_id=config.bos_token_id, pad_token_id=tok.pad_token_id, do_sample=True,
                           eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")])
    return _save(Qwen2ForCausalLM(config), tok, gen, path)


def build_llama3(path: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A random LlamaForCausalLM (untied embeddings, like Llama-3-8B) and its tokenizer, saved to `path`."""
    import torch

    torch.manual_seed(seed)
    tok = llama3_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0, tie_word_embeddings=False,
        rms_norm_eps=1e-5, initializer_range=initializer_range, bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|end_of_text|>"),
    )
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, do_sample=True,
                           eos_token_id=[tok.convert_tokens_to_ids("<|end_of_text|>"), tok.eos_token_id])
    return _save(LlamaForCausalLM(config), tok, gen, path)


# ----------------------------------------------------------------------------------------------------- data


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ultrachat_row(rng: random.Random, i: int, turns: int = 1) -> dict[str, Any]:
    """A HuggingFaceH4/ultrachat_200k row: prompt, prompt_id, messages (user/assistant turns, no system)."""
    messages = []
    for _ in range(turns):
        messages.append({"content": _sentence(rng, rng.randint(3, 8)), "role": "user"})
        messages.append({"content": _sentence(rng, rng.randint(3, 10)), "role": "assistant"})
    return {"prompt": messages[0]["content"], "prompt_id": f"{i:064x}", "messages": messages}


def ultrafeedback_row(rng: random.Random) -> dict[str, Any]:
    """An openbmb/UltraFeedback row: an instruction and 4 completions, each with its overall_score."""
    completions = []
    for model, score in zip(("gpt-4", "llama-2-7b-chat", "bard", "wizardlm-7b"), rng.sample([9.0, 7.5, 6.0, 3.0], 4),
                            strict=True):
        completions.append({"model": model, "response": _sentence(rng, rng.randint(3, 9)), "overall_score": score,
                            "critique": "Fine.", "custom_system_prompt": "Be helpful.", "principle": "helpfulness",
                            "fine-grained_score": score / 2, "annotations": {}})
    return {"source": "evol_instruct", "instruction": _sentence(rng, rng.randint(3, 8)),
            "models": [c["model"] for c in completions], "completions": completions,
            "correct_answers": [], "incorrect_answers": []}


def fineweb_row(rng: random.Random, i: int) -> dict[str, Any]:
    """A HuggingFaceFW/fineweb-edu row: text plus crawl metadata."""
    text = " ".join(_sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(3, 8)))
    return {"text": text, "id": f"<urn:uuid:{i}>", "dump": "CC-MAIN-2024-10", "url": f"https://example.org/{i}",
            "file_path": "s3://commoncrawl/x.warc.gz", "language": "en", "language_score": 0.95,
            "token_count": len(text.split()), "score": 3.1, "int_score": 3}


def write_hub_shaped_data(d: Path, seed: int = 0) -> dict[str, Path]:
    """Small local files in the shapes of the hub sets the chat-model profiles name, by registry entry."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    uf = [ultrafeedback_row(rng) for _ in range(48)]
    return {
        "fineweb_edu": _jsonl(d / "fineweb.train.jsonl", [fineweb_row(rng, i) for i in range(120)]),
        "fineweb_edu_heldout": _jsonl(d / "fineweb.eval.jsonl", [fineweb_row(rng, i) for i in range(20)]),
        "ultrachat": _jsonl(d / "ultrachat.train.jsonl",
                            [ultrachat_row(rng, i, turns=1 + i % 2) for i in range(48)]),
        "ultrachat_test": _jsonl(d / "ultrachat.test.jsonl", [ultrachat_row(rng, i) for i in range(12)]),
        "ultrafeedback_train": _jsonl(d / "ultrafeedback.train.jsonl", uf[:40]),
        "ultrafeedback_heldout": _jsonl(d / "ultrafeedback.heldout.jsonl", uf[40:]),
        "ultrafeedback_prompts_train": _jsonl(d / "ultrafeedback.prompts.train.jsonl", uf[:40]),
        "ultrafeedback_prompts_heldout": _jsonl(d / "ultrafeedback.prompts.heldout.jsonl", uf[40:]),
    }
