"""Sampled-generation evaluation: sample completions for held-out prompts and score them with a gold reward.

Sampling (temperature 1, several samples per prompt) rather than greedy decoding, because greedy
decoding hides the differences between policies that RLHF is about (see shared/RECIPE.md).
Prompts are split across processes under `accelerate launch` and the scores gathered, so every process
returns the same global statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import ConfigError, GenerationEvalConfig
from pipeline.modeling import plain_sampling

GoldFn = Callable[[str, str, bool], float]


@dataclass
class Sample:
    prompt: str
    completion: str
    ended: bool  # the model emitted EOS within the budget
    num_tokens: int
    gold: float | None = None


def gold_function(name: str | None) -> GoldFn | None:
    """The gold reward named in the config (`gold_reward`), or None for real data without one."""
    if name is None:
        return None
    if name == "tinytask":
        from pipeline.tinytask import gold_score

        return gold_score
    raise ValueError(f"unknown gold reward {name!r}")


def check_gold_covers(gold: GoldFn | None, rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, key: str) -> None:
    """Fail before training, not after it, when the gold reward cannot score the held-out prompts."""
    if gold is None:
        return
    for row in rows:
        plain = render_prompt(row, tokenizer)[1]
        try:
            gold(plain, "", True)
        except ValueError as e:
            raise ConfigError(
                f"'gold_reward' cannot score the prompt {plain!r} of '{key}' ({e}); "
                "set gold_reward: null for data that is not the tiny task"
            ) from None


def render_prompt(row: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(model input text, plain prompt for the gold reward) of a prompt-completion or messages row."""
    if row.get("messages"):
        messages = list(row["messages"])
        if messages[-1]["role"] == "assistant":  # a demonstration: the prompt is everything before the answer
            messages = messages[:-1]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        user = [m["content"] for m in messages if m["role"] == "user"]
        return text, (user[-1] if user else "")
    return row["prompt"], row["prompt"]


def chat_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """A plain prompt as one user turn through the chat template, followed by the assistant's header (config
    `chat_prompts`). A prompt that already ends with that header is returned as it is: the label stage writes the
    prompts it sampled from, rendered, into its to-label file and so into the rankings made from it, and the
    reward model must read those exactly as the policy did, not wrapped a second time."""
    turn = [{"role": "user", "content": ""}]
    bare = tokenizer.apply_chat_template(turn, tokenize=False)
    full = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    header = full[len(bare):] if full.startswith(bare) and len(full) > len(bare) else None
    if header and prompt.endswith(header):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    cfg: GenerationEvalConfig,
    seed: int,
    show_progress: bool = True,
) -> list[Sample]:
    """Sample `cfg.samples_per_prompt` completions of each prompt (left-padded batches, KV cache, stop at EOS)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts are padded on the left
    out: list[Sample] = []
    try:
        starts = range(0, len(prompts), cfg.batch_size)
        for start in tqdm(starts, desc="Sampling completions", disable=not show_progress or len(starts) < 2):
            batch = list(prompts[start : start + cfg.batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            # Seed each batch from our own generator so results do not depend on what ran before.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            with plain_sampling(model):
                seqs = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=cfg.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=cfg.max_new_tokens,
                    num_return_sequences=cfg.samples_per_prompt,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = seqs[:, enc["input_ids"].shape[1] :].cpu()
            for i, row in enumerate(new):
                eos = (row == tokenizer.eos_token_id).nonzero()
                end = int(eos[0]) if len(eos) else len(row)
                out.append(
                    Sample(
                        prompt=batch[i // cfg.samples_per_prompt],
                        completion=tokenizer.decode(row[:end], skip_special_tokens=True),
                        ended=bool(len(eos)),
                        num_tokens=end + int(bool(len(eos))),
                    )
                )
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def generation_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    cfg: GenerationEvalConfig,
    gold: GoldFn | None,
    accelerator: Accelerator,
    seed: int,
) -> tuple[dict[str, float], list[dict]]:
    """Sample completions for held-out prompt rows on all processes; return global metrics and the samples.

    Metrics: `gold_score` (mean gold reward, when a gold reward exists), `perfect_rate` (share of samples
    with gold 1), `eos_rate`, `completion_length` (tokens, EOS included).
    """
    rows = list(rows)[: cfg.num_prompts]
    if not rows:
        return {}, []
    rendered = [render_prompt(r, tokenizer) for r in rows]
    with accelerator.split_between_processes(list(range(len(rendered)))) as mine:
        texts = [rendered[i][0] for i in mine]
        samples = sample_completions(model, tokenizer, texts, cfg, seed + accelerator.process_index,
                                     show_progress=accelerator.is_main_process)
        plain = {rendered[i][0]: rendered[i][1] for i in mine}
        records = []
        for s in samples:
            if gold is not None:
                s.gold = gold(plain[s.prompt], s.completion, s.ended)
            records.append({"prompt": plain[s.prompt], **{k: v for k, v in vars(s).items() if k != "prompt"}})
    records = gather_object(records) if accelerator.num_processes > 1 else records
    metrics = {
        "eos_rate": sum(r["ended"] for r in records) / len(records),
        "completion_length": sum(r["num_tokens"] for r in records) / len(records),
    }
    if gold is not None:
        golds = [r["gold"] for r in records]
        metrics["gold_score"] = sum(golds) / len(golds)
        metrics["perfect_rate"] = sum(math.isclose(g, 1.0) for g in golds) / len(golds)
    return metrics, records
