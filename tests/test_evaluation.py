"""Sampled-generation eval: prompt rendering, EOS handling, and the gold-score statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from pipeline.config import GenerationEvalConfig, load_config
from pipeline.evaluation import generation_eval, render_prompt
from pipeline.modeling import build_tiny_tokenizer
from pipeline.tinytask import gold_score


@pytest.fixture(scope="module")
def tokenizer(small_data: dict[str, Path]):
    cfg = load_config("configs/tiny.yaml", [f"tokenizer.train_data={small_data['corpus_train']}",
                                            "tokenizer.vocab_size=600"])
    return build_tiny_tokenizer(cfg.tokenizer)


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends a scripted continuation to every (left-padded) prompt."""

    def __init__(self, continuations: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids: torch.Tensor, num_return_sequences: int, **kwargs) -> torch.Tensor:
        rows = input_ids.repeat_interleave(num_return_sequences, dim=0)
        width = max(len(c) for c in self.continuations)
        pad = kwargs["pad_token_id"]
        tails = [c + [pad] * (width - len(c)) for c in self.continuations[: len(rows)]]
        return torch.cat([rows, torch.tensor(tails)], dim=1)


def test_plain_prompt_is_used_as_is_and_messages_go_through_the_chat_template(tokenizer) -> None:
    assert render_prompt({"prompt": "count to two\n"}, tokenizer) == ("count to two\n", "count to two\n")
    row = {"messages": [{"role": "user", "content": "count to two"}, {"role": "assistant", "content": "one two"}]}
    text, plain = render_prompt(row, tokenizer)
    assert text == "<|user|>\ncount to two\n<|assistant|>\n"  # the answer is dropped; the model writes it
    assert plain == "count to two"


def test_completions_stop_at_eos_and_metrics_average_the_gold_score(tokenizer) -> None:
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    # As from a real batched generate: a finished row is padded after its EOS; a row that never ended
    # ran to the full budget (here 4 tokens).
    continuations = [
        [*ids("one two"), eos, tokenizer.pad_token_id],
        ids("one two three four"),
    ]
    assert len(continuations[1]) == 4
    model = ScriptedModel(continuations)
    cfg = GenerationEvalConfig(num_prompts=5, samples_per_prompt=2, max_new_tokens=8, batch_size=4)
    metrics, records = generation_eval(model, tokenizer, [{"prompt": "count to two\n"}], cfg, gold_score,
                                       Accelerator(cpu=True), seed=0)
    assert [r["completion"] for r in records] == ["one two", "one two three four"]
    assert [r["ended"] for r in records] == [True, False]
    assert [r["num_tokens"] for r in records] == [len(ids("one two")) + 1, 4]  # EOS counts, padding does not
    # gold: 1.0 for the clean answer; the second has extra words (x0.5) and no EOS (x0.5): 0.25
    assert [r["gold"] for r in records] == [1.0, 0.25]
    assert metrics["gold_score"] == pytest.approx((1.0 + 0.25) / 2)
    assert metrics["perfect_rate"] == 0.5 and metrics["eos_rate"] == 0.5
