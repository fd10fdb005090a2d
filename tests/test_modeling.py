"""Model loading: the tiny builder, the from_pretrained path, tokenizer overrides, and clear load errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from trl.chat_template_utils import has_generation_markers

from pipeline.config import load_config
from pipeline.modeling import (
    CHAT_TEMPLATE,
    ModelLoadError,
    build_tiny_model,
    build_tiny_tokenizer,
    load_base,
    load_stage_model,
)


@pytest.fixture(scope="module")
def tiny_cfg(small_data: dict[str, Path]):
    return load_config("configs/tiny.yaml", [f"tokenizer.train_data={small_data['corpus_train']}"])


def test_tiny_profile_builds_a_small_gpt2_whose_embedding_covers_every_token_id(tiny_cfg) -> None:
    tokenizer = build_tiny_tokenizer(tiny_cfg.tokenizer)
    model = build_tiny_model(tiny_cfg.model, tokenizer)
    assert model.num_parameters() < 5_000_000
    assert model.config.vocab_size > max(tokenizer.get_vocab().values())
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # Byte-level: any text round-trips, including words the corpus never had.
    text = "Zebra-crossing ünïcode 42\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert has_generation_markers(tokenizer.chat_template)


def test_a_tokenizer_override_resizes_the_embedding_and_drives_generation(tiny_cfg, tmp_path: Path) -> None:
    base_tok = build_tiny_tokenizer(tiny_cfg.tokenizer)
    model = build_tiny_model(tiny_cfg.model, base_tok)
    model.save_pretrained(tmp_path / "model")
    base_tok.save_pretrained(tmp_path / "model")
    extended = build_tiny_tokenizer(tiny_cfg.tokenizer)
    extended.add_special_tokens({"additional_special_tokens": [f"<|extra{i}|>" for i in range(700)]})
    extended.save_pretrained(tmp_path / "tok")

    cfg = load_config("configs/tiny.yaml", [f"model.name_or_path={tmp_path / 'model'}",
                                            f"tokenizer.name_or_path={tmp_path / 'tok'}"])
    loaded, tokenizer = load_base(cfg.model, cfg.tokenizer)
    assert len(tokenizer) == len(extended)
    assert loaded.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id


def test_a_model_directory_without_a_chat_template_gets_ours(tiny_cfg, tmp_path: Path) -> None:
    tok = build_tiny_tokenizer(tiny_cfg.tokenizer)
    build_tiny_model(tiny_cfg.model, tok).save_pretrained(tmp_path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    _, loaded = load_stage_model(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE


def test_missing_or_unloadable_models_fail_with_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no finished model at .*nowhere: build it with `make pretrain`"):
        load_stage_model(tmp_path / "nowhere", make_target="pretrain")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"cannot load (tokenizer|model) '.*broken'"):
        load_stage_model(broken)


def test_loaded_gpt2s_run_the_one_kernel_gelu_with_the_same_outputs_and_saved_config(tiny_cfg, tmp_path: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    from pipeline.modeling import load_reward_model

    tokenizer = build_tiny_tokenizer(tiny_cfg.tokenizer)
    model = build_tiny_model(tiny_cfg.model, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "summary.json").write_text("{}")  # what a finished stage leaves
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).eval()  # transformers' own loading: gelu_new's eight ops
    loaded, _ = load_stage_model(tmp_path)
    reward, _ = load_reward_model(tmp_path)
    for m in (model, loaded, reward):
        acts = [type(a) for a in m.modules() if isinstance(a, (GELUTanh, NewGELUActivation))]
        assert acts and set(acts) == {GELUTanh}, acts
    assert any(isinstance(a, NewGELUActivation) for a in plain.modules())
    ids = torch.randint(0, len(tokenizer), (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(tmp_path / "again")  # the swap is not written into checkpoints
    assert GPT2LMHeadModel.config_class.from_pretrained(tmp_path / "again").activation_function == "gelu_new"
