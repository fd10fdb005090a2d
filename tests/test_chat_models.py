"""Modern chat models: the chat-model profiles' code paths on tiny local stand-ins (tests/standin.py).

What differs from GPT-2, and where it is checked here:
- the assistant-only SFT mask through a real chat template without `{% generation %}` markers (Qwen2.5's with
  its default system prompt, Llama 3's), and a clear error for a template TRL cannot mark (Llama 3.1's);
- left-padded rollouts on RoPE models: every row's log-probs, values and reward equal those of the same
  sequence alone, unpadded;
- the reward read at the last real token when the tokenizer has no pad token (Llama 3: `<|pad|>` is added), and
  the reward shift of an RMSNorm model without head bias kept in `config.reward_shift` and subtracted on load;
- `chat_prompts`: plain prompts through the chat template, the reward model reading the ids PPO samples from;
- each profile's stages run for a few steps on its stand-in, its registry entries redirected to local files in
  the hub sets' shapes, and its dry run. The Qwen2.5-0.5B profile (full fine-tuning, four stages and label) is
  the fast representative; the Llama runs (one process, and under ZeRO-3 on 2 processes, adapters off; the
  LoRA / QLoRA profiles as shipped) are slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import llama3_1_chat_template

from pipeline.config import Config, ConfigError, load_config
from pipeline.modeling import compute_rewards, load_causal_lm, load_reward_model, shift_reward, token_scores
from pipeline.rollout import Models, PolicyAndValue, generate_rollout
from pipeline.stages import ppo, pretrain, rm, sft
from tests import standin
from tests.conftest import run_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standin.build_qwen2(tmp_path_factory.mktemp("qwen2-standin"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standin.build_llama3(tmp_path_factory.mktemp("llama3-standin"))


@pytest.fixture(scope="session")
def hub_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return standin.write_hub_shaped_data(tmp_path_factory.mktemp("hub-shaped"))


# ------------------------------------------------------------------------------------------ SFT mask

CHAT = [
    {"role": "system", "content": "You answer in few words."},
    {"role": "user", "content": "Name a river."},
    {"role": "assistant", "content": "The Nile."},
    {"role": "user", "content": "And a planet?"},
    {"role": "assistant", "content": "Mars, the red one."},
]
NO_SYSTEM = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]


def trained_spans(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of tokens with a label (labels != -100), decoded with special tokens."""
    spans: list[list[int]] = []
    prev = False
    for t, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == t  # labels are the inputs themselves; the shift happens in the loss
            if not prev:
                spans.append([])
            spans[-1].append(t)
        prev = lab != -100
    return [tokenizer.decode(s) for s in spans]


def sft_batch(model_dir: Path, rows: list[dict], tmp_path: Path) -> tuple[PreTrainedTokenizerBase, dict]:
    """SFTTrainer's first training batch of `rows`, with the args the sft stage gives it (assistant-only loss)."""
    model, tokenizer = load_causal_lm(str(model_dir))
    sft.training_chat_template(tokenizer)  # what the stage checks first: TRL has a marked copy of this template
    args = SFTConfig(output_dir=str(tmp_path), max_length=256, report_to="none", use_cpu=True,
                     per_device_train_batch_size=len(rows), assistant_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return tokenizer, next(iter(trainer.get_train_dataloader()))


def test_qwen_template_trains_the_assistant_turns_only(qwen_dir: Path, tmp_path: Path) -> None:
    rows = [{"messages": CHAT}, {"messages": NO_SYSTEM}]
    tokenizer, batch = sft_batch(qwen_dir, rows, tmp_path)
    for i, row in enumerate(rows):
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()
        # The model trains on exactly the text its real template renders (TRL's marked copy renders the same),
        # the default system prompt included when the row has none ...
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
        if i == 1:
            assert standin.QWEN_SYSTEM in tokenizer.decode(ids)
        # ... and the loss covers each assistant turn's content and its <|im_end|> (so it learns to stop), never
        # the system prompt, the user turns or the role headers.
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained_spans(tokenizer, ids, labels) == [f"\n{a}<|im_end|>\n" for a in answers]
        assert all(lab == -100 for lab in batch["labels"][i, n:].tolist())  # padding


def test_llama3_template_trains_the_assistant_turns_only(llama_dir: Path, tmp_path: Path) -> None:
    rows = [{"messages": CHAT}, {"messages": NO_SYSTEM}]
    tokenizer, batch = sft_batch(llama_dir, rows, tmp_path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eot_id|>"  # no pad token of its own: EOS pads
    for i, row in enumerate(rows):
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert tokenizer.decode(ids) == rendered and rendered.count("<|begin_of_text|>") == 1  # one BOS, not two
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        # The padding EOS after the last turn is not trained: only the turn's own <|eot_id|>.
        assert trained_spans(tokenizer, ids, labels) == [f"{a}<|eot_id|>" for a in answers]


def test_template_trl_cannot_mark_is_a_config_error(llama_dir: Path, tmp_path: Path) -> None:
    _, tokenizer = load_causal_lm(str(llama_dir))
    tokenizer.chat_template = llama3_1_chat_template  # Llama 3.1's: TRL has no marked copy of it
    with pytest.raises(ConfigError, match=r"no \{% generation %\} markers and TRL has no training variant"):
        sft.training_chat_template(tokenizer, str(llama_dir))


# ------------------------------------------------------------------------------------------ RoPE rollouts


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_left_padded_rollout_matches_each_sequence_alone(which: str, tmp_path: Path) -> None:
    """A rollout left-pads prompts of different lengths and right-pads completions: with the attention mask and
    position ids it passes, a RoPE model's log-probs, values and reward of every row are those of the sequence
    alone. (RoPE sees relative positions only, so it is the masking that matters here; GPT-2's learned positions
    need the ids too, tests/test_ppo.py.) Weights at a large scale make the outputs depend on the context: at the
    usual 0.02 a tiny random model hardly attends, and a padding token seen by mistake would go unnoticed."""
    build = standin.build_qwen2 if which == "qwen" else standin.build_llama3
    model_dir = build(tmp_path / which, initializer_range=0.5)
    policy, tokenizer = load_causal_lm(str(model_dir))
    reward_model, rm_tokenizer = load_reward_model(model_dir)
    value_model, _ = load_reward_model(model_dir)
    if which == "llama":  # no pad token: the policy pads with EOS, the reward model got <|pad|> of its own
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
        assert rm_tokenizer.pad_token == "<|pad|>" and reward_model.config.pad_token_id == len(rm_tokenizer) - 1
    for m in (policy, reward_model, value_model):
        m.eval()
    accelerator = Accelerator(cpu=True)
    models = Models(accelerator, PolicyAndValue(policy, value_model), policy, reward_model, tokenizer)
    texts = ["Hi.", "Please explain rivers and planets in three words or four."]
    prompts = [(tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True), t) for t in texts]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["ppo.max_new_tokens=6", "ppo.minibatch_size=2", "ppo.max_prompt_length=256"])
    r = generate_rollout(models, prompts, cfg.ppo, None, seed=0)
    assert r.attention_mask[0, 0] == 0 and r.attention_mask[1, 0] == 1  # the short prompt is left-padded
    for b in range(len(prompts)):
        real = r.attention_mask[b].bool()
        ids = r.query_responses[b][real][None]  # the sequence alone: no padding, positions 0..n-1
        n_prompt = int(r.attention_mask[b, : r.context_length].sum())
        n = int(r.mask[b].sum())
        with torch.no_grad():
            logits = policy(input_ids=ids).logits[0, n_prompt - 1 : -1].float()
            logprobs = torch.log_softmax(logits / cfg.ppo.temperature, -1).gather(-1, ids[0, n_prompt:, None])[:, 0]
            torch.testing.assert_close(r.logprobs[b, :n], logprobs[:n], atol=1e-4, rtol=1e-4)
            values = token_scores(value_model, ids, torch.ones_like(ids))[0, n_prompt - 1 : -1]
            torch.testing.assert_close(r.values[b, :n], values[:n], atol=1e-4, rtol=1e-4)
            # The reward at the completion's last real token = the reward model's own pooled output, right-padded.
            seq = ids[:, : n_prompt + n]
            padded = torch.cat([seq, seq.new_full((1, 3), reward_model.config.pad_token_id)], 1)
            mask = torch.cat([torch.ones_like(seq), torch.zeros(1, 3, dtype=seq.dtype)], 1)
            torch.testing.assert_close(r.scores[b], compute_rewards(reward_model, padded, mask)[0],
                                       atol=1e-4, rtol=1e-4)


def test_reward_shift_without_bias_is_kept_in_config_and_subtracted_on_load(llama_dir: Path, tmp_path: Path) -> None:
    """RMSNorm has no bias and the Llama/Qwen score head none either: the shift goes to config.reward_shift,
    which survives save_pretrained and which compute_rewards and token_scores subtract after loading."""
    model, tokenizer = load_reward_model(llama_dir)
    ids = torch.tensor([tokenizer("Hi there.<|eot_id|>", add_special_tokens=False)["input_ids"]])
    att = torch.ones_like(ids)
    with torch.no_grad():
        before = compute_rewards(model, ids, att)
    assert shift_reward(model, 2.5) == "config.reward_shift"
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    loaded, _ = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(compute_rewards(loaded, ids, att), before - 2.5)
        torch.testing.assert_close(token_scores(loaded, ids, att)[:, -1], before - 2.5)


# ------------------------------------------------------------------------------------------ profiles on stand-ins

# The profiles' sizes cut to seconds on a CPU (no bf16 here: CPUs train in float32).
SMALL = [
    "pretrain.max_steps=2", "pretrain.batch_size=2", "pretrain.grad_accum=1", "pretrain.block_size=64",
    "pretrain.logging_steps=1", "pretrain.bf16=false",
    "sft.max_steps=2", "sft.batch_size=4", "sft.grad_accum=1", "sft.max_length=256", "sft.logging_steps=1",
    "sft.eval_steps=null", "sft.bf16=false", "sft.generation.num_prompts=2", "sft.generation.samples_per_prompt=1",
    "sft.generation.max_new_tokens=6",
    "rm.max_steps=2", "rm.batch_size=2", "rm.grad_accum=1", "rm.max_length=128", "rm.logging_steps=1",
    "rm.eval_steps=null", "rm.bf16=false",
    "ppo.iterations=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
    "ppo.max_prompt_length=64", "ppo.max_new_tokens=6", "ppo.eval_prompts=2", "ppo.eval_samples_per_prompt=1",
    "ppo.eval_batch_size=2", "ppo.ptx_batch_size=2", "ppo.ptx_block_size=32", "ppo.eval_corpus_blocks=2",
    "ppo.eval_steps=1", "ppo.save_steps=1", "ppo.table_steps=1", "ppo.bf16=false",
]


def standin_config(profile: str, model_dir: Path, hub_files: dict[str, Path], run_dir: Path, *extra: str) -> Config:
    """The profile as shipped, its model the stand-in and its registry entries local files of the hub shapes."""
    cfg = load_config(ROOT / "configs" / f"{profile}.yaml",
                      [f"run_dir={run_dir}", f"model.name_or_path={model_dir}", *SMALL, *extra])
    for name, path in hub_files.items():
        entry = cfg.datasets[name]
        cfg.datasets[name] = dataclasses.replace(entry, hub=None, split=None, subset=None, data_dir=None,
                                                 path=str(path))
    return cfg


def profile_stages(cfg: Config) -> list[Any]:
    """The stages the profile runs: all four, or sft, rm and ppo when sft starts from the hub model."""
    return [pretrain, sft, rm, ppo] if cfg.sft.init is None else [sft, rm, ppo]


def summary(cfg: Config, stage: str) -> dict[str, Any]:
    return json.loads((Path(cfg.run_dir) / stage / "summary.json").read_text())


def test_qwen_profile_runs_every_stage_on_its_standin(
    qwen_dir: Path, hub_files: dict[str, Path], tmp_path: Path
) -> None:
    cfg = standin_config("qwen2.5-0.5b", qwen_dir, hub_files, tmp_path / "runs")
    assert cfg.model.name_or_path == str(qwen_dir) and not cfg.sft.lora.enabled  # full fine-tuning
    for stage in profile_stages(cfg):
        stage.run(cfg)
    assert [s.__name__.rsplit(".", 1)[-1] for s in profile_stages(cfg)] == ["pretrain", "sft", "rm", "ppo"]
    run = Path(cfg.run_dir)
    assert summary(cfg, "sft")["conversational"] is True
    # The saved SFT tokenizer keeps the model's real template (TRL's marked copy was for training only).
    _, tok = load_causal_lm(str(run / "sft"))
    assert tok.chat_template == standin.qwen_tokenizer().chat_template
    # The reward model: Qwen2 with a bias-free score head after RMSNorm, so the normalization shift is kept in
    # its config; the held-out demonstrations then average ~0 through every loader.
    rm_summary = summary(cfg, "rm")
    assert rm_summary["normalization"]["method"] == "config.reward_shift"
    assert abs(rm_summary["metrics"]["rm/demo_reward_mean"]) < 1e-4
    model, _ = load_reward_model(run / "rm")
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    assert model.config.reward_shift == pytest.approx(rm_summary["normalization"]["shift"])
    # PPO wrote a policy that loads as the same architecture, and sampled through the chat template.
    assert type(AutoModelForCausalLM.from_pretrained(run / "ppo")).__name__ == "Qwen2ForCausalLM"
    samples = [json.loads(line) for line in (run / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all("prompt" in s and "completion" in s for s in samples)
    # The label stage samples the PPO policy's completions of the training prompts, through the chat template too.
    from pipeline.stages import label

    label.run(dataclasses.replace(cfg, label=dataclasses.replace(
        cfg.label, policy="ppo", num_prompts=3, k=3, max_new_tokens=6, batch_size=3)))
    items = [json.loads(line) for line in (run / "label" / "to_label.jsonl").read_text().splitlines()]
    assert items and all(i["prompt"].endswith("<|im_start|>assistant\n") for i in items)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_trained_as_adapter(base: Path, out: Path) -> None:
    """`out` was trained with LoRA from `base`, whatever form the saved model takes (merged or not): the input
    embeddings, which no adapter targets, are the base's to the bit (full fine-tuning moves every row it sees),
    while the attention projections the adapters target did move."""
    before, after = _weights(base), _weights(out)
    emb = "model.embed_tokens.weight"
    vocab = before[emb].shape[0]  # the reward model may have added a <|pad|> row
    # Compared in the lower of the two precisions (a stage may save another dtype than it loaded): a cast of
    # unchanged weights rounds the same way, so equality stays exact.
    low = min(before[emb].dtype, after[emb].dtype, key=lambda d: torch.finfo(d).bits)
    assert torch.equal(after[emb][:vocab].to(low), before[emb].to(low)), f"{out}: the embeddings moved: not LoRA"
    q = "model.layers.0.self_attn.q_proj.weight"
    if q in after:  # a merged model; an unmerged adapter directory holds adapter weights only
        assert not torch.equal(after[q], before[q]), f"{out}: q_proj did not move"


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["llama3-8b-qlora", "llama3-8b-lora-zero3"])
def test_llama3_lora_profiles_run_on_their_standin(
    profile: str, llama_dir: Path, hub_files: dict[str, Path], tmp_path: Path
) -> None:
    """The 8B profiles as shipped (LoRA r=16 on sft, rm and ppo; QLoRA's 4-bit base) on the tiny Llama, one
    CPU process (the ZeRO-3 launch itself is tested in tests/test_zero.py)."""
    shipped = load_config(ROOT / "configs" / f"{profile}.yaml")
    assert shipped.sft.lora.r == shipped.rm.lora.r == shipped.ppo.lora.r == 16
    extra = [f"sft.init={llama_dir}"] if shipped.sft.init else []  # QLoRA: sft starts from the hub model
    cfg = standin_config(profile, llama_dir, hub_files, tmp_path / "runs", *extra)
    stages = profile_stages(cfg)
    assert len(stages) == (3 if profile == "llama3-8b-qlora" else 4)
    for stage in stages:
        stage.run(cfg)
    run = Path(cfg.run_dir)
    sft_base = Path(cfg.sft.init) if cfg.sft.init else run / "pretrain"
    assert_trained_as_adapter(sft_base, run / "sft")
    assert_trained_as_adapter(run / "sft", run / "rm")
    assert_trained_as_adapter(run / "sft", run / "ppo")
    model, tokenizer = load_reward_model(run / "rm")
    assert tokenizer.pad_token == "<|pad|>" and model.config.pad_token_id == tokenizer.pad_token_id
    assert summary(cfg, "rm")["normalization"]["method"] == "config.reward_shift"
    assert summary(cfg, "ppo")["metrics"]["ppo/iterations"] == 2


@pytest.mark.slow
def test_llama3_profile_in_full_fine_tuning_runs_every_stage_on_its_standin(
    llama_dir: Path, hub_files: dict[str, Path], tmp_path: Path
) -> None:
    """The Llama path without adapters (what runs before the LoRA stages): no pad token in the policy's tokenizer,
    `<|pad|>` added to the reward model's, Llama 3's template, untied embeddings, all four stages."""
    no_lora = [f"{s}.lora.r=0" for s in ("sft", "rm", "ppo")]
    cfg = standin_config("llama3-8b-lora-zero3", llama_dir, hub_files, tmp_path / "runs", *no_lora,
                         "model.dtype=float32")
    for stage in profile_stages(cfg):
        stage.run(cfg)
    run = Path(cfg.run_dir)
    policy, tokenizer = load_causal_lm(str(run / "ppo"))
    assert type(policy).__name__ == "LlamaForCausalLM" and not policy.config.tie_word_embeddings
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the policy's own tokenizer still has no pad
    model, rm_tokenizer = load_reward_model(run / "rm")
    assert rm_tokenizer.pad_token == "<|pad|>" and model.config.pad_token_id == rm_tokenizer.pad_token_id
    assert summary(cfg, "rm")["normalization"]["method"] == "config.reward_shift"
    assert abs(summary(cfg, "rm")["metrics"]["rm/demo_reward_mean"]) < 1e-4
    assert summary(cfg, "ppo")["metrics"]["ppo/iterations"] == 2


# ------------------------------------------------------------------------------------------ chat_prompts


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_chat_prompts_give_the_reward_model_the_ids_ppo_samples_from(
    which: str, request: pytest.FixtureRequest, hub_files: dict[str, Path], tmp_path: Path
) -> None:
    """With `chat_prompts` (the chat profiles), an UltraFeedback instruction reaches the policy in PPO as a user
    turn of the chat template, and the reward model trains on exactly those prompt ids followed by the completion
    and EOS: the ids it will score in PPO. Without it both read the raw text."""
    from pipeline.data import load_rankings
    from pipeline.evaluation import render_prompt
    from pipeline.ranking import encode_rankings
    from pipeline.rollout import encode_prompts

    model_dir = request.getfixturevalue(f"{which}_dir")
    _, tokenizer = load_causal_lm(str(model_dir))
    for chat in (True, False):
        cfg = standin_config("qwen2.5-0.5b", model_dir, hub_files, tmp_path / "runs", f"chat_prompts={chat}")
        train_rows, _, _, _ = ppo.load_data(cfg)
        text, plain = render_prompt(train_rows[0], tokenizer)  # what ppo.run does with each prompt row
        ppo_ids = encode_prompts(tokenizer, [text], 512, torch.device("cpu"))["input_ids"][0].tolist()
        rankings = load_rankings("ultrafeedback_train", registry=cfg.datasets)
        assert rankings[0]["prompt"] == plain  # the same instruction, first row of the same file
        ranking = encode_rankings(rankings.select([0]), tokenizer, 512, "rm.data.train", chat)[0]
        completion = tokenizer(ranking.completions[0], add_special_tokens=False)["input_ids"]
        assert ranking.input_ids[0] == ppo_ids + completion + [tokenizer.eos_token_id]
        assert ranking.prompt == plain
        if chat:
            assert tokenizer.decode(ppo_ids).endswith(
                "<|im_start|>assistant\n" if which == "qwen" else "<|start_header_id|>assistant<|end_header_id|>\n\n")
        else:
            assert tokenizer.decode(ppo_ids) == plain
    # sft's prompt-completion rows become [user, assistant] conversations, so the template trains them too.
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Name a river.", "completion": "The Nile."}) + "\n")
    cfg = standin_config("qwen2.5-0.5b", model_dir, hub_files, tmp_path / "runs", f"sft.data.train={demos}",
                         "sft.data.eval=null")
    train, _, conversational = sft.load_data(cfg)
    assert conversational and train[0]["messages"] == [{"role": "user", "content": "Name a river."},
                                                       {"role": "assistant", "content": "The Nile."}]


@pytest.mark.parametrize(("profile", "which"), [("qwen2.5-0.5b", "qwen"), ("llama3-8b-qlora", "llama")])
def test_dry_run_of_each_stage_shows_the_chat_template(
    profile: str, which: str, request: pytest.FixtureRequest, hub_files: dict[str, Path], tmp_path: Path
) -> None:
    """`make dry-run PROFILE=<chat profile>` (what the README runs first) on the stand-ins: every stage the profile
    runs checks its data and shows an example as the model sees it, prompts inside the chat template."""
    import io

    from pipeline import dryrun

    model_dir = request.getfixturevalue(f"{which}_dir")
    shipped = load_config(ROOT / "configs" / f"{profile}.yaml")
    cfg = standin_config(profile, model_dir, hub_files, tmp_path / "runs",
                         *([f"sft.init={model_dir}"] if shipped.sft.init else []))
    header = "<|im_start|>assistant" if which == "qwen" else "<|start_header_id|>assistant<|end_header_id|>"
    for stage in [s.__name__.rsplit(".", 1)[-1] for s in profile_stages(cfg)]:
        out = io.StringIO()
        dryrun.run(cfg, stage, out)
        text = out.getvalue()
        if stage != "pretrain":
            assert header in text, f"{stage}: {text[:2000]}"
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_llama3_zero3_profile_runs_every_stage_under_deepspeed_zero3(
    llama_dir: Path, hub_files: dict[str, Path], tmp_path: Path
) -> None:
    """The llama3-8b-lora-zero3 profile launched as its header says (`accelerate launch --config_file
    configs/accelerate/zero3.yaml -m pipeline <stage>`), on 2 CPU processes over gloo, adapters off (full fine-tuning:
    what its pretrain stage does): the Llama stand-in's weights sharded as they load, the reward model's added
    `<|pad|>` row and its shift kept in config under ZeRO-3, all four stages. About 2-3 minutes."""
    import sys

    registry = [f"datasets.{name}.{k}=null" for name in hub_files for k in ("hub", "split", "subset")]
    registry += [f"datasets.{name}.path={path}" for name, path in hub_files.items()]
    run = tmp_path / "runs"
    overrides = [f"run_dir={run}", f"model.name_or_path={llama_dir}", "model.dtype=float32", "tracking.wandb=false",
                 "sft.lora.r=0", "rm.lora.r=0", "ppo.lora.r=0", *SMALL, *registry]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    for stage in ("pretrain", "sft", "rm", "ppo"):
        proc = run_group(
            [accelerate, "launch", "--config_file", "configs/accelerate/zero3.yaml", "--num_processes", "2",
             "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "pipeline", stage,
             "--config", "configs/llama3-8b-lora-zero3.yaml", *overrides],
            timeout=600, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
        assert proc.returncode == 0, (stage, proc.stderr[-4000:])
        done = json.loads((run / stage / "summary.json").read_text())
        assert done["distributed"]["type"] == "DEEPSPEED" and done["distributed"]["zero_stage"] == 3
    rm_summary = json.loads((run / "rm" / "summary.json").read_text())
    assert rm_summary["normalization"]["method"] == "config.reward_shift"
    assert abs(rm_summary["metrics"]["rm/demo_reward_mean"]) < 1e-4
    model, tokenizer = load_reward_model(run / "rm")
    assert tokenizer.pad_token == "<|pad|>" and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert type(AutoModelForCausalLM.from_pretrained(run / "ppo")).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_chat_prompt_wraps_a_plain_prompt_once(which: str, request: pytest.FixtureRequest) -> None:
    """Rankings made from the label stage's to-label file hold the prompt as the policy saw it, already rendered:
    under `chat_prompts` the reward model reads it as it is, so a plain prompt and its rendered form give the same
    ids, and a plain prompt that merely mentions the template's tokens elsewhere is still wrapped."""
    from pipeline.evaluation import chat_prompt, render_prompt

    _, tokenizer = load_causal_lm(str(request.getfixturevalue(f"{which}_dir")))
    rendered, _ = render_prompt({"messages": [{"role": "user", "content": "Name a river."}]}, tokenizer)
    assert chat_prompt("Name a river.", tokenizer) == rendered
    assert chat_prompt(rendered, tokenizer) == rendered
    odd = "What does <|im_start|> mean?"
    assert chat_prompt(odd, tokenizer).count(odd) == 1 and chat_prompt(odd, tokenizer) != odd
