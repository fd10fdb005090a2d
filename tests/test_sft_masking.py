"""Completion-only loss: SFT labels cover the completion (and its EOS) and nothing of the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from pipeline.config import load_config
from pipeline.modeling import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(small_data: dict[str, Path]):
    cfg = load_config(
        "configs/tiny.yaml",
        [f"tokenizer.train_data={small_data['corpus_train']}", "tokenizer.vocab_size=600",
         "model.tiny.n_layer=1", "model.tiny.n_embd=32", "model.tiny.n_head=2"],
    )
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    return build_tiny_model(cfg.model, tokenizer), tokenizer


def first_batch(model, tokenizer, rows: list[dict], tmp_path: Path, **kwargs) -> dict:
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, report_to="none", per_device_train_batch_size=len(rows),
                     bf16=False, use_cpu=True,
                     **kwargs)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return next(iter(trainer.get_train_dataloader()))


def test_prompt_completion_labels_cover_completion_and_eos_only(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    rows = [{"prompt": "count to three\n", "completion": "one two three"},
            {"prompt": "repeat the word cat two times\n", "completion": "cat cat"}]
    batch = first_batch(model, tokenizer, rows, tmp_path, completion_only_loss=True)
    for i, row in enumerate(rows):
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        expected = [-100] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
        labels = batch["labels"][i].tolist()
        # Right padding is masked too: pad with -100 to the batch length.
        expected += [-100] * (len(labels) - len(expected))
        assert labels == expected
        n = len(prompt_ids) + len(completion_ids) + 1
        assert batch["input_ids"][i, :n].tolist() == prompt_ids + completion_ids + [tokenizer.eos_token_id]


def test_conversational_labels_cover_assistant_turns_only(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    rows = [{"messages": [{"role": "user", "content": "count to two"}, {"role": "assistant", "content": "one two"},
                          {"role": "user", "content": "list two fruits"}, {"role": "assistant", "content": "apple pear"}]}]
    batch = first_batch(model, tokenizer, rows, tmp_path, assistant_only_loss=True)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    expected = (tokenizer("one two", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                + tokenizer("apple pear", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    assert trained == expected  # both answers and their EOS, no user turn, no role marker
    assert all(lab == -100 or lab == t for t, lab in zip(ids, labels, strict=True))
