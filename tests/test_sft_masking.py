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


def token_losses(model, batch: dict) -> list[float]:
    """Every trained token's cross-entropy, in batch order (the model's own shift: token t predicts t + 1)."""
    import torch

    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    losses = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
    return sorted(losses.tolist())


def test_packed_batches_train_every_demonstration_on_exactly_its_unpacked_tokens(
    tiny, make_config, tmp_path: Path
) -> None:
    """sft.packing: the stage's own TRL arguments and collator pack several demonstrations into a row; each
    keeps its completion-only labels and attends only to itself (position ids restart, transformers masks
    across them), so the trained tokens' losses are those of the unpacked, padded batch."""
    import torch

    from pipeline.stages.sft import trl_args, use_packed_rows

    tokenizer = tiny[1]
    # A model of its own: SFTTrainer patches the forward of a model it trains (a copy would keep the patch).
    model = build_tiny_model(make_config().model, tokenizer)
    torch.manual_seed(0)
    for p in model.parameters():  # a trained-looking model: random enough that contamination would show
        p.data.normal_(0, 0.2)
    rows = [{"prompt": "count to three\n", "completion": "one two three"},
            {"prompt": "repeat the word cat two times\n", "completion": "cat cat"},
            {"prompt": "list two colours\n", "completion": "red, blue"},
            {"prompt": "count to five\n", "completion": "one two three four five"}]

    def batch(packing: bool) -> tuple[SFTTrainer, dict]:
        cfg = make_config(f"sft.packing={str(packing).lower()}", "sft.max_length=64", f"sft.batch_size={len(rows)}")
        args = trl_args(cfg, tmp_path / f"packed-{packing}", has_eval=False, conversational=False)
        args.use_cpu, args.shuffle_dataset = True, False
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        use_packed_rows(trainer, cfg)  # as the stage does
        return trainer, next(iter(trainer.get_train_dataloader()))

    (packed_trainer, packed), (padded_trainer, padded) = batch(True), batch(False)
    # Packed rows as rows, no attention mask; position ids restart at each demonstration.
    assert packed["input_ids"].shape[0] < len(rows) and "attention_mask" not in packed
    starts = packed["position_ids"][:, :-1] >= packed["position_ids"][:, 1:]
    assert int(starts.sum()) + packed["input_ids"].shape[0] == len(rows)
    assert padded["input_ids"].shape[0] == len(rows)
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()  # the same trained tokens
    collator = packed_trainer.data_collator
    assert int(collator.real_tokens(packed)) == int(padded["attention_mask"].sum())  # padding not counted
    a, b = token_losses(model, packed), token_losses(model, padded)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    with torch.no_grad():  # the training loss itself, as each trainer computes it (its own forward path)
        loss_packed = packed_trainer.compute_loss(model, dict(packed))
        loss_padded = padded_trainer.compute_loss(model, dict(padded))
    assert abs(float(loss_packed) - float(loss_padded)) < 1e-4 and abs(float(loss_packed) - sum(b) / len(b)) < 1e-4
    # Without the restarted positions the same row attends across demonstrations: the check above can fail.
    crossed = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert not torch.allclose(torch.tensor(token_losses(model, crossed)), torch.tensor(b), atol=1e-4)


def test_packing_refuses_a_model_whose_attention_would_mix_packed_demonstrations(
    tiny, make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' causal mask follows restarting position ids; a model that ignores them (here: the tiny
    GPT-2 given a plain causal mask whatever the positions) is refused with one clear error."""
    import torch
    import transformers.models.gpt2.modeling_gpt2 as gpt2

    from pipeline.config import ConfigError
    from pipeline.packing import separates_packed_sequences
    from pipeline.stages.sft import trl_args, use_packed_rows

    model = build_tiny_model(make_config().model, tiny[1])
    assert separates_packed_sequences(model)
    assert separates_packed_sequences(build_tiny_model(make_config().model, tiny[1]).to(torch.bfloat16))
    create = gpt2.create_causal_mask
    monkeypatch.setattr(gpt2, "create_causal_mask", lambda **kw: create(**{**kw, "position_ids": None}))
    assert not separates_packed_sequences(model)
    cfg = make_config("sft.packing=true")
    args = trl_args(cfg, tmp_path / "out", has_eval=False, conversational=False)
    args.use_cpu = True
    trainer = SFTTrainer(model=model, args=args, processing_class=tiny[1],
                         train_dataset=Dataset.from_list([{"prompt": "count to two\n", "completion": "one two"}]))
    with pytest.raises(ConfigError, match=r"'sft\.packing': GPT2LMHeadModel lets packed sequences attend"):
        use_packed_rows(trainer, cfg)


def test_row_packed_collator_keeps_rows_restarts_positions_and_counts_real_tokens() -> None:
    """Two packed rows of different lengths: right padding at position 0 with label -100, no attention mask, the
    first token of every demonstration unlabelled, and the real tokens counted without the padding, also when
    the pad id is a token the demonstrations use (here 8, as when the pad token is the EOS)."""
    from pipeline.packing import RowPackedCollator

    collator = RowPackedCollator(pad_token_id=8)
    batch = collator([
        {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "seq_lengths": [2, 2]},  # two demonstrations
        {"input_ids": [9, 10, 8], "labels": [-100, 10, 8], "seq_lengths": [3]},
    ])
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 8, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 2, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 10, 8, -100]]
    assert int(collator.real_tokens(batch)) == 7
