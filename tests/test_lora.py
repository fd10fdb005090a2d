"""LoRA and QLoRA (pipeline/lora.py): adapters in sft, rm and ppo, merged outputs, and PPO on one base model.

The chain runs in-process on the small data slices: pretrain (full), then sft, rm and ppo with `<stage>.lora.r`.
What is checked: every LoRA stage's directory loads with a plain `from_pretrained` and is its adapter merged into
the full-precision base; PPO holds one copy of the base weights for policy, reference, value and reward model; the
reference (adapters off) gives the SFT model's logits exactly; with `model.load_in_4bit` the base is 4-bit, the
adapter trains through it, the adapter-off model is the 4-bit base, and the merged output is full precision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_overrides
from peft import PeftModel, load_peft_weights
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline import lora, rollout
from pipeline.config import ConfigError, load_config
from pipeline.modeling import compute_rewards, fuse_activations, load_reward_model
from pipeline.stages import ppo, pretrain, rm, sft

LORA = ["sft.lora.r=8", "sft.lora.alpha=16", "sft.lr=5e-3", "sft.lora.modules_to_save=[wte]", "rm.lora.r=8", "rm.lr=2e-3", "ppo.lora.r=8",
        "ppo.lr=5e-4", "tracking.wandb=false", "ppo.iterations=2", "ppo.eval_steps=null"]


@pytest.fixture(scope="module")
def lora_chain(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, Path]) -> dict[str, Any]:
    """pretrain → sft → rm → ppo, the last three with LoRA; the PPO stage's models are kept for inspection."""
    run = tmp_path_factory.mktemp("lora")
    cfg = load_config("configs/tiny.yaml", [*small_overrides(small_data, run), *LORA])
    captured: dict[str, Any] = {}
    original = ppo.Models

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured["models"] = original(*args, **kwargs)
        return captured["models"]

    pretrain.run(cfg)
    sft.run(cfg)
    rm.run(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo, "Models", capture)
        ppo.run(cfg)
    return {"run": run, "cfg": cfg, "models": captured["models"]}


def _ids(vocab: int = 300) -> torch.Tensor:
    return torch.randint(5, vocab, (3, 17), generator=torch.Generator().manual_seed(0))


def _tensors(role: Any) -> list[torch.Tensor]:
    """Every parameter a PPO role computes with: a module's own, or for a role of the shared base (a view) the
    shared module's."""
    module = role if isinstance(role, torch.nn.Module) else role._shared
    return list(module.parameters())


def test_lora_stage_outputs_are_plain_models_equal_to_base_plus_adapter(lora_chain: dict[str, Any]) -> None:
    run = lora_chain["run"]
    ids = _ids()
    for stage, base in (("sft", run / "pretrain"), ("ppo", run / "sft")):
        out = run / stage
        adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == 8 and Path(adapter["base_model_name_or_path"]).resolve() == base.resolve()
        merged = AutoModelForCausalLM.from_pretrained(out)  # the stage directory is the trained model
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
        plain = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            a, b, c = merged(ids).logits, with_adapter(ids).logits, plain(ids).logits
        assert torch.allclose(a, b, atol=1e-4), (stage, float((a - b).abs().max()))
        assert float((a - c).abs().max()) > 1e-3, f"{stage}: the adapter changed nothing"
    # sft trained GPT-2's tied embedding in full (modules_to_save: [wte]): the output head trained with it, as one
    # matrix, and the merged model is still tied (peft alone would untie them and leave the head at the base's).
    merged, base = AutoModelForCausalLM.from_pretrained(run / "sft"), AutoModelForCausalLM.from_pretrained(
        run / "pretrain")
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.transformer.wte.weight
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)
    saved = load_peft_weights(str(run / "sft" / "adapter"), device="cpu")
    assert any("wte" in k for k in saved), sorted(saved)
    # The reward model: merged (normalization shift in its weights) = base + adapter + head - shift.
    summary = json.loads((run / "rm" / "summary.json").read_text())
    shift = summary["normalization"]["shift"]
    merged, tok = load_reward_model(run / "rm")
    base = AutoModelForSequenceClassification.from_pretrained(run / "sft", num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    with_adapter = PeftModel.from_pretrained(base, run / "rm" / "adapter")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        r_merged = compute_rewards(merged, ids, mask)
        r_adapter = compute_rewards(with_adapter, ids, mask) - shift
    assert torch.allclose(r_merged, r_adapter, atol=1e-4), (r_merged, r_adapter)


def test_lora_ppo_holds_one_base_and_the_reference_is_the_sft_model_exactly(lora_chain: dict[str, Any]) -> None:
    run, models = lora_chain["run"], lora_chain["models"]
    shared = models.accelerator.unwrap_model(models.model)
    roles = {"policy": shared.policy, "reference": models.ref_policy, "value": shared.value_model,
             "reward": models.reward_model}
    sft_model = fuse_activations(AutoModelForCausalLM.from_pretrained(run / "sft"))  # as every stage loads it
    base_tensors = {n: t for n, t in sft_model.named_parameters()}  # one copy of the base: this many tensors
    storages: set[int] = set()
    for role in roles.values():
        for t in _tensors(role):
            if t.dim() >= 2 and t.numel() >= 64 * 64 and not t.requires_grad:  # base matrices (frozen)
                storages.add(t.untyped_storage().data_ptr())
    n_base = sum(1 for t in base_tensors.values() if t.dim() >= 2 and t.numel() >= 64 * 64)
    assert len(storages) == n_base, f"{len(storages)} frozen base matrices held, one copy has {n_base}"
    assert summary_lora(run)["shared_base"] is True and summary_lora(run)["reward_model"] == "adapter"
    # Only adapters and the value head train; the reward adapter and head never.
    trained = [n for n, t in shared.named_parameters() if t.requires_grad]
    assert trained and all(("lora_" in n and ".reward." not in n) or n == "value_head.weight" for n in trained)
    assert any(".value." in n for n in trained) and any(".default." in n for n in trained)
    # Dropout off everywhere, the adapters' own included: rollout and update log-probs must agree.
    assert all(m.p == 0 for m in shared.modules() if isinstance(m, torch.nn.Dropout))
    # The reference after training: the SFT model's logits, exactly.
    ids = _ids()
    with torch.no_grad():
        ref = models.ref_policy(input_ids=ids, use_cache=False).logits
        policy = shared.policy(input_ids=ids, use_cache=False).logits
        expected = sft_model(ids).logits
    assert torch.equal(ref, expected)
    assert float((policy - expected).abs().max()) > 1e-4, "the policy adapter did not train"
    # The shared base's rollout reads the policy's old log-probs while sampling (float32); recomputed by a forward
    # through the policy adapter (what bf16 / 4-bit runs do) they are the same.
    p, prompts = lora_chain["cfg"].ppo, [("count to three\n",) * 2, ("repeat the word cat six times\n",) * 2]
    assert rollout.logprobs_from_sampling(models, p)
    sampled = rollout.generate_rollout(models, prompts, p, gold=None, seed=0)
    p.logprobs_from_sampling = False
    try:
        recomputed = rollout.generate_rollout(models, prompts, p, gold=None, seed=0)
    finally:
        p.logprobs_from_sampling = None
    assert torch.equal(sampled.query_responses, recomputed.query_responses)
    assert torch.allclose(sampled.logprobs, recomputed.logprobs, atol=1e-5)


@pytest.mark.slow
def test_lora_ppo_with_activation_checkpointing_takes_the_same_steps(lora_chain: dict[str, Any], tmp_path: Path
                                                                      ) -> None:
    """Policy and value are two adapters of one base, switched inside one forward: a checkpointed layer recomputed
    in the backward pass must run with the adapter it ran with, or the gradients are another model's."""
    run = lora_chain["run"]
    cfg = lora_chain["cfg"]
    histories = []
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        c = load_config("configs/tiny.yaml", [*_overrides(lora_chain), f"run_dir={out}", f"ppo.init={run / 'sft'}",
                                              f"ppo.reward_model={run / 'rm'}", "ppo.lora.r=8", "ppo.lr=5e-3",
                                              f"ppo.data.train={cfg.ppo.data.train}", "ppo.iterations=2",
                                              "ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.ppo_epochs=2",
                                              "ppo.max_new_tokens=8", "ppo.eval_prompts=2", "ppo.ptx_coef=0",
                                              "ppo.eval_corpus_blocks=0",
                                              f"ppo.gradient_checkpointing={str(checkpointing).lower()}"])
        ppo.run(c)
        rows = [json.loads(line) for line in (out / "ppo" / "log_history.jsonl").read_text().splitlines()]
        histories.append([r[k] for r in rows if "ppo/loss" in r for k in ("ppo/policy_loss", "ppo/value_loss", "ppo/kl")])
    assert len(histories[0]) == 6
    # iteration 2 samples from the policy iteration 1 trained: equal only if the gradients were equal
    assert histories[1] == pytest.approx(histories[0], rel=1e-5, abs=1e-6)


def summary_lora(run: Path) -> dict[str, Any]:
    return json.loads((run / "ppo" / "summary.json").read_text())["distributed"]["lora"]


def test_qlora_sft_trains_through_a_4bit_base_and_saves_a_full_precision_merge(
    lora_chain: dict[str, Any], tmp_path: Path
) -> None:
    run = lora_chain["run"]
    cfg = load_config("configs/tiny.yaml", [*_overrides(lora_chain), f"run_dir={tmp_path}", f"sft.init={run / 'pretrain'}",
                                            "model.load_in_4bit=true", "model.bnb_4bit_compute_dtype=float32"])
    metrics = sft.run(cfg)
    assert metrics["train/loss"] == metrics["train/loss"]  # finite
    quant = lora.quantization_config(cfg)
    base4 = AutoModelForCausalLM.from_pretrained(run / "pretrain", quantization_config=quant, device_map={"": "cpu"})
    assert type(base4.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    lora.keep_trainable_4bit_layout(base4)  # the layout training used (no CPU inference repacking)
    ids = _ids()
    with torch.no_grad():
        plain4 = base4(ids).logits
        adapted = PeftModel.from_pretrained(base4, tmp_path / "sft" / "adapter")
        with adapted.disable_adapter():
            off = adapted(ids).logits
        on = adapted(ids).logits
    assert torch.equal(off, plain4)  # adapter off = the 4-bit base
    assert float((on - off).abs().max()) > 1e-3  # the adapter learned through the 4-bit base
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert "quantization_config" not in config  # merged into the full-precision base, not into 4-bit weights
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert merged.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "pretrain"), tmp_path / "sft" / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, full(ids).logits, atol=1e-4)


def _overrides(lora_chain: dict[str, Any]) -> list[str]:
    cfg = lora_chain["cfg"]
    return [f"{k}={v}" for k, v in (("tokenizer.train_data", cfg.tokenizer.train_data),
                                    ("sft.data.train", cfg.sft.data.train), ("sft.data.eval", cfg.sft.data.eval))] + [
        "sft.max_steps=4", "sft.batch_size=8", "sft.generation.num_prompts=4", "sft.generation.max_new_tokens=8",
        "sft.lora.r=8", "sft.lr=5e-3", "tracking.wandb=false"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.load_in_4bit=true"], "model.load_in_4bit trains an adapter on a frozen quantized base: set sft.lora.r"),
    (["ppo.lora.r=8", "ppo.value_init=runs/x/rm"], "ppo.value_init with ppo.lora"),
    (["model.load_in_4bit=true", "model.load_in_8bit=true"], "model.load_in_4bit and model.load_in_8bit"),
])
def test_lora_misconfigurations_are_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        cfg = load_config("configs/tiny.yaml", overrides)
        (sft if "sft" in message or "load_in_4bit trains" in message else ppo).run(cfg)
