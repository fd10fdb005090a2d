"""The PPO-ptx stage: masks and padding in rollouts, the outputs and their loading, resume, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from pipeline import packing, rlhf, rollout
from pipeline.__main__ import main
from pipeline.config import Config, ConfigError, load_config
from pipeline.modeling import causal_lm_logits, load_stage_model, plain_sampling, token_scores
from pipeline.stages import ppo
from tests.conftest import run_group


def _tiny_models(vocab: int = 50) -> tuple[GPT2LMHeadModel, GPT2ForSequenceClassification]:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=1,
                        eos_token_id=0, bos_token_id=0, num_labels=1)
    return GPT2LMHeadModel(config).eval(), GPT2ForSequenceClassification(config).eval()


# ------------------------------------------------------------------------------------------ masks and padding


def test_left_padding_changes_no_log_prob_value_or_reward() -> None:
    """A prompt padded on the left (as in a batch with a longer prompt) must give the same per-token
    log-probs, values and reward as the same prompt alone: the attention mask hides the padding and the
    position ids start at the first real token."""
    policy, value = _tiny_models()
    prompt, completion = [5, 6, 7], [8, 9, 0, 1, 1]  # completion: two tokens, EOS (0), then padding (1)
    mask, ended = rlhf.completion_mask(torch.tensor([completion]), eos_token_id=0)
    assert mask.tolist() == [[1, 1, 1, 0, 0]] and ended.tolist() == [True]

    def run(left_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.tensor([[1] * left_pad + prompt + completion])
        attention = torch.cat([torch.tensor([[0] * left_pad + [1] * len(prompt)]), mask.long()], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        context = left_pad + len(prompt)
        with torch.no_grad():
            logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits
            logprobs = rollout.response_logprobs(logits, ids, context, temperature=1.0) * mask
            scores = token_scores(value, ids, attention, positions)
        values = scores[:, context - 1 : -1] * mask
        reward = scores[0, context + int(rlhf.last_token_index(mask)[0])]
        return logprobs, values, reward

    lp0, v0, r0 = run(0)
    lp3, v3, r3 = run(3)
    assert torch.allclose(lp0, lp3, atol=1e-5) and torch.allclose(v0, v3, atol=1e-5)
    assert float(r0) == pytest.approx(float(r3), abs=1e-5)
    # The reward is read at the EOS: the same as the sequence-classification head pools on an unpadded input.
    with torch.no_grad():
        pooled = value(input_ids=torch.tensor([prompt + completion[:3]])).logits[0, 0]
    assert float(r0) == pytest.approx(float(pooled), abs=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # SDPA: rows packed without padding; eager: windows
def test_scoring_on_the_used_columns_only_gives_the_numbers_of_the_whole_padded_batch(attention: str) -> None:
    """`score_rollout` cuts each block of rows to the columns they use (shared left padding, padding after the
    longest completion) or packs them without padding, and asks for completion-position logits only: every real
    token must get the numbers of plain forwards over the whole padded batch, and padding must stay 0."""
    policy, value = _tiny_models()
    ref, reward = _tiny_models()  # same seed: equal weights, but separate modules
    for m in (policy, value, ref, reward):
        m.set_attn_implementation(attention)
    assert packing.can_pack(policy) == (attention == "sdpa")
    pad, eos = 1, 0
    # Three rows, prompt width 6, completion width 7; rows 0-1 form one scoring block (minibatch_size=2) whose
    # prompts are at most 3 long and completions at most 3: its window is 6 of the 13 columns.
    prompts = [[pad, pad, pad, 5, 6, 7], [pad, pad, pad, pad, 8, 9], [2, 3, 4, 5, 6, 7]]
    completions = [[8, 9, eos, pad, pad, pad, pad], [10, eos, pad, pad, pad, pad, pad], [11, 12, 13, 14, 15, 16, 17]]
    mask, _ = rlhf.completion_mask(torch.tensor(completions), eos)
    ids = torch.cat([torch.tensor(prompts), torch.tensor(completions)], dim=1)
    attention = torch.cat([(torch.tensor(prompts) != pad).long(), mask.long()], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    context = 6
    assert packing.token_window(attention[:2], mask[:2], context) == (3, 9)
    p = load_config("configs/tiny.yaml", ["ppo.minibatch_size=1", "ppo.rollout_batch_size=2"]).ppo
    p.minibatch_size, p.temperature = 2, 0.7
    models = rollout.Models(Accelerator(cpu=True), rollout.PolicyAndValue(policy, value).eval(), ref, reward, None)
    ref_logprobs, values, scores, none = rollout.score_rollout(models, ids, attention, positions, context, mask, p)
    assert none is None  # the policy's log-probs come from sampling unless asked for (`with_policy`)
    *_, logprobs = rollout.score_rollout(models, ids, attention, positions, context, mask, p, with_policy=True)
    with torch.no_grad():
        expected_lp = rollout.response_logprobs(ref(input_ids=ids, attention_mask=attention,
                                                    position_ids=positions).logits, ids, context, 0.7) * mask
        expected_v = token_scores(value, ids, attention, positions)[:, context - 1 : -1] * mask
        rm = token_scores(reward, ids, attention, positions)
    expected_scores = rm[torch.arange(3), context + rlhf.last_token_index(mask)]
    assert ref_logprobs.shape == values.shape == logprobs.shape == mask.shape == (3, 7)
    assert torch.allclose(ref_logprobs, expected_lp, atol=1e-5) and torch.allclose(logprobs, expected_lp, atol=1e-5)
    assert torch.allclose(values, expected_v, atol=1e-5) and torch.allclose(scores, expected_scores, atol=1e-5)
    assert ref_logprobs[mask == 0].eq(0).all() and values[mask == 0].eq(0).all()


def test_packed_rows_give_each_token_the_numbers_of_its_padded_row() -> None:
    """The update packs a minibatch's rows into fewer rows without padding (block-diagonal causal mask, positions
    restarting per sequence): the log-probs and values at the completion-predicting positions must be those of the
    padded rows, with gradients flowing back."""
    policy, value = _tiny_models()
    pad = 1
    prompts = [[pad, pad, 5, 6, 7], [pad, pad, pad, 8, 9], [2, 3, 4, 5, 6], [pad, pad, pad, pad, 3]]
    completions = [[8, 9, 0, pad], [10, 0, pad, pad], [11, 12, 13, 14], [15, 0, pad, pad]]
    mask, _ = rlhf.completion_mask(torch.tensor(completions), 0)
    ids = torch.cat([torch.tensor(prompts), torch.tensor(completions)], dim=1)
    attention = torch.cat([(torch.tensor(prompts) != pad).long(), mask.long()], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    context, n = 5, 4
    assert packing.can_pack(policy) and packing.can_pack(value)
    packed = packing.pack_rows(ids, attention, positions, context, n)
    assert packed.input_ids.numel() < ids.numel()  # 4 rows of up to 9 real tokens in fewer slots than 4 × 9
    with torch.no_grad():
        padded_lp = rollout.response_logprobs(policy(input_ids=ids, attention_mask=attention,
                                                     position_ids=positions).logits, ids, context, 1.0)
        padded_v = token_scores(value, ids, attention, positions)[:, context - 1 : -1]
    # The LM head runs on the completion-predicting positions only (`index`): the same logits as all, unpacked.
    logits = causal_lm_logits(policy, packed.input_ids, packed.attention_mask, packed.position_ids,
                              index=packed.index)
    with torch.no_grad():
        every = packed.unpack(policy(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                     position_ids=packed.position_ids).logits)
    assert logits.shape == every.shape == (4, n, policy.config.vocab_size) and torch.allclose(logits, every, atol=1e-6)
    assert not policy.lm_head._forward_pre_hooks  # removed: a later forward (the ptx batch) gets every position
    lp = rlhf.logprobs_from_logits(logits, ids[:, context:])
    v = packed.unpack(token_scores(value, packed.input_ids, packed.attention_mask, packed.position_ids))
    assert torch.allclose(lp * mask, padded_lp * mask, atol=1e-5) and torch.allclose(v * mask, padded_v * mask, atol=1e-5)
    (lp * mask).sum().backward()
    assert policy.transformer.wte.weight.grad is not None


@pytest.mark.parametrize("top_k", [0, 3])
def test_log_probs_read_while_sampling_are_those_of_a_forward_over_the_completions(top_k: int) -> None:
    """PPO's old log-probs come from the logits `generate` computes to sample (`SampledLogprobs`), not from a
    second forward: they must be the full distribution's at the sampling temperature (top-k changes what is
    sampled, not the policy's distribution), on left-padded prompts, for every sampled token up to its EOS."""
    policy, _ = _tiny_models()
    pad, eos = 1, 0
    prompts = [[pad, pad, 5, 6, 7], [2, 3, 4, 5, 6], [pad, pad, pad, 8, 9]]
    ids = torch.tensor(prompts)
    attention = (ids != pad).long()
    recorder = rollout.SampledLogprobs(policy, temperature=0.7)
    torch.manual_seed(0)
    with torch.no_grad():
        sequences = policy.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=0.7,
                                    top_k=top_k, top_p=1.0, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad,
                                    logits_processor=rollout.LogitsProcessorList([recorder]))
    recorder.remove()
    completions = sequences[:, 5:]
    logprobs = recorder.logprobs(completions)
    assert logprobs.shape == completions.shape == (3, 6)
    mask, _ = rlhf.completion_mask(completions, eos)
    full = torch.cat([attention, mask.long()], dim=1)
    with torch.no_grad():
        logits = policy(input_ids=sequences, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
    expected = rollout.response_logprobs(logits, sequences, 5, temperature=0.7)
    assert torch.allclose(logprobs * mask, expected * mask, atol=1e-5)
    assert not policy._forward_hooks  # the hook is gone: later forwards are not recorded


def test_sampling_ignores_the_sampling_defaults_a_checkpoint_ships() -> None:
    """A checkpoint's generation_config.json may ship sampling defaults (Qwen2.5-Instruct: repetition_penalty
    1.1, top_k 20, top_p 0.8) that `generate` applies to whatever a call leaves unset. Rollouts and evaluation
    sample under `plain_sampling`: the samples of the model's own distribution, as if the checkpoint shipped
    none, and the model keeps its config (it is saved with the checkpoint)."""
    policy, _ = _tiny_models()
    ids = torch.tensor([[5, 6, 7], [2, 3, 4]])

    def sample() -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                   temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, eos_token_id=0,
                                   pad_token_id=1)

    plain = sample()
    policy.generation_config.repetition_penalty = 100.0
    policy.generation_config.no_repeat_ngram_size = 1
    assert not torch.equal(sample(), plain)  # what the shipped defaults do to a plain `generate`
    with plain_sampling(policy):
        assert torch.equal(sample(), plain)
    assert policy.generation_config.repetition_penalty == 100.0 and policy.generation_config.no_repeat_ngram_size == 1


def test_rollout_masks_everything_after_eos_and_scores_the_last_real_token(sft_dir: Path, rm_dir: Path) -> None:
    cfg = _config_for_unit(sft_dir, rm_dir)
    accelerator = Accelerator(cpu=True)
    policy, tokenizer = load_stage_model(sft_dir)
    ref, _ = load_stage_model(sft_dir)
    from pipeline.modeling import load_reward_model

    reward_model, _ = load_reward_model(rm_dir)
    value_model, _ = load_reward_model(rm_dir)
    model = rollout.PolicyAndValue(policy, value_model)
    prompts = [("count to three\n", "count to three\n"), ("repeat the word cat six times\n",) * 2]
    models = rollout.Models(accelerator, model, ref, reward_model, tokenizer)
    assert cfg.ppo.logprobs_from_sampling is None and rollout.logprobs_from_sampling(models, cfg.ppo)  # float32
    r = rollout.generate_rollout(models, prompts, cfg.ppo, gold=None, seed=0)
    # Recomputed by a forward instead (what bf16 / quantized runs do): the same samples and log-probs.
    cfg.ppo.logprobs_from_sampling = False
    again = rollout.generate_rollout(models, prompts, cfg.ppo, gold=None, seed=0)
    assert torch.equal(again.query_responses, r.query_responses)
    assert torch.allclose(again.logprobs, r.logprobs, atol=1e-5)
    cfg.ppo.logprobs_from_sampling = None

    class MixedPrecision:  # an Accelerator under bf16 (one process holds one AcceleratorState)
        mixed_precision = "bf16"

        def unwrap_model(self, m: torch.nn.Module) -> torch.nn.Module:
            return m

    assert not rollout.logprobs_from_sampling(rollout.Models(MixedPrecision(), model, ref, reward_model, tokenizer),
                                              cfg.ppo)
    # Completions are cut to the longest one (EOS included), not padded to max_new_tokens.
    R = int(r.mask.sum(1).max())
    assert 1 <= R <= cfg.ppo.max_new_tokens
    assert r.responses.shape == (2, R) and r.mask.shape == (2, R) and r.logprobs.shape == (2, R)
    # Left padding: the shorter prompt starts with padding the attention mask hides.
    assert r.attention_mask[0, 0] == 0 and r.attention_mask[1, 0] == 1
    for b in range(2):
        n = int(r.mask[b].sum())
        assert r.mask[b, :n].eq(1).all() and r.mask[b, n:].eq(0).all()  # a prefix of ones
        assert r.logprobs[b, n:].eq(0).all() and r.ref_logprobs[b, n:].eq(0).all() and r.values[b, n:].eq(0).all()
        if r.ended[b]:
            assert int(r.responses[b, n - 1]) == tokenizer.eos_token_id
        # Policy = reference at the start: no KL yet.
        assert torch.allclose(r.logprobs[b], r.ref_logprobs[b], atol=1e-5)
        # The score is the reward model's on prompt + completion (EOS included), unpadded.
        ids = tokenizer(prompts[b][0], add_special_tokens=False)["input_ids"] + r.responses[b, :n].tolist()
        with torch.no_grad():
            expected = token_scores(reward_model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert float(r.scores[b]) == pytest.approx(float(expected[0, -1]), abs=1e-4)


def _config_for_unit(sft_dir: Path, rm_dir: Path) -> Config:
    return load_config("configs/tiny.yaml", [f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}",
                                             "ppo.max_new_tokens=8", "ppo.minibatch_size=2",
                                             "ppo.rollout_batch_size=2"])


# ------------------------------------------------------------------------------------------ the stage


def test_ppo_writes_a_policy_a_value_model_and_the_metrics_of_every_iteration(
    make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path
) -> None:
    cfg = make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}")
    metrics = ppo.run(cfg)
    out = cfg.stage_dir("ppo")
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval/gold_score", "eval/gold_score_init", "eval/gold_score_gain", "eval/kl_to_sft", "eval/score",
                "eval/score_init", "eval/corpus_loss", "eval/corpus_loss_init", "ppo/kl", "ppo/score"):
        assert key in summary["metrics"], key
    assert metrics["eval/kl_init"] == pytest.approx(0.0, abs=1e-5)  # the SFT policy against itself
    assert metrics["eval/gold_score_gain"] == pytest.approx(metrics["eval/gold_score"] - metrics["eval/gold_score_init"])

    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    train_rows = [r for r in history if "ppo/score" in r]
    assert [r["train/global_step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("ppo/score", "ppo/kl", "ppo/kl_k3", "ppo/kl_penalty", "ppo/beta", "ppo/entropy", "ppo/policy_loss",
                "ppo/value_loss", "ppo/clip_frac", "ppo/approx_kl", "ppo/explained_var", "ppo/ptx_loss",
                "ppo/completion_length", "ppo/eos_rate", "ppo/gold_score"):
        assert key in train_rows[-1], key
    assert train_rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-4)  # sampled before the first update
    assert [r["train/global_step"] for r in history if "eval/gold_score" in r] == [0, 2, 4]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 2 and set(ppo.SAMPLE_COLUMNS) <= set(samples[0])

    # The policy is a plain causal LM for the next user; the value model sits beside it.
    policy = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer("count to two\n", return_tensors="pt")
    generated = policy.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > enc["input_ids"].shape[1]
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value.config.num_labels == 1
    assert not (out.parent / "ppo.partial").exists()


def test_ptx_coef_zero_is_plain_ppo(make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path) -> None:
    cfg = make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}", "ppo.ptx_coef=0", "ppo.iterations=2",
                      "ppo.eval_steps=null")
    ppo.run(cfg)
    history = [json.loads(line) for line in (cfg.stage_dir("ppo") / "log_history.jsonl").read_text().splitlines()]
    assert [r["train/global_step"] for r in history if "ppo/score" in r] == [1, 2]
    assert not any("ppo/ptx_loss" in r for r in history)


@pytest.mark.slow
def test_oracle_run_maximizes_the_gold_reward_and_a_separate_reference_anchors_the_kl(
    make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path, tmp_path: Path
) -> None:
    """ppo.reward=gold: the score PPO sees is the gold reward itself. ppo.reference: a policy continued from an
    earlier PPO run is penalized against SFT, so its held-out KL is to SFT from the first evaluation on."""
    cfg = make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}", "ppo.reward=gold", "ppo.iterations=2", "ppo.lr=1e-3",
                      "ppo.eval_steps=null", "ppo.ptx_coef=0")
    ppo.run(cfg)
    first = cfg.stage_dir("ppo")
    history = [json.loads(line) for line in (first / "log_history.jsonl").read_text().splitlines()]
    rows = [r for r in history if "ppo/score" in r]
    assert [r["ppo/score"] for r in rows] == pytest.approx([r["ppo/gold_score"] for r in rows])

    cont = make_config(f"ppo.init={first}", f"ppo.reference={sft_dir}", f"ppo.reward_model={rm_dir}",
                       "ppo.iterations=1", "ppo.eval_steps=null", "ppo.ptx_coef=0", run_dir=tmp_path / "round2")
    metrics = ppo.run(cont)
    assert metrics["eval/kl_init"] > 1e-4  # the continued policy already differs from its SFT reference

    with pytest.raises(ConfigError, match="gold reward"):
        ppo.run(make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}", "ppo.reward=gold",
                            "gold_reward=null", run_dir=tmp_path / "nogold"))


def test_adaptive_kl_controller_moves_beta_and_the_summary_keeps_the_last_value(
    make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path
) -> None:
    cfg = make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}", "ppo.target_kl=1000", "ppo.kl_horizon=16",
                      "ppo.kl_coef=0.1", "ppo.iterations=3", "ppo.eval_steps=null", "ppo.ptx_coef=0")
    metrics = ppo.run(cfg)
    history = [json.loads(line) for line in (cfg.stage_dir("ppo") / "log_history.jsonl").read_text().splitlines()]
    betas = [r["ppo/beta"] for r in history if "ppo/beta" in r]
    # KL far below the target: error clipped at -0.2, β ← β (1 − 0.2 · 8 / 16) = 0.9 β after every iteration.
    assert betas == pytest.approx([0.1, 0.09, 0.081])
    assert metrics["ppo/beta"] == pytest.approx(0.0729)


def test_interrupted_ppo_resumes_from_its_checkpoint_and_matches_the_uninterrupted_run(
    make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = (f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}", "ppo.eval_steps=null")
    reference = make_config(*overrides, run_dir=tmp_path / "uninterrupted")
    ppo.run(reference)

    cfg = make_config(*overrides, run_dir=tmp_path / "interrupted")
    real_update = ppo.ppo_update

    def interrupted(*args, **kwargs):
        if args[-1] == 2:  # iteration index 2 (the third): after checkpoint-2 was written
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(cfg)
    assert not cfg.stage_dir("ppo").exists()
    checkpoints = cfg.stage_dir("ppo").parent / "ppo.partial" / "checkpoints"
    assert sorted(d.name for d in checkpoints.iterdir()) == ["checkpoint-2"]

    monkeypatch.setattr(ppo, "ppo_update", real_update)
    ppo.run(cfg)
    summary = json.loads((cfg.stage_dir("ppo") / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2")

    def rows(c: Config) -> dict[int, dict]:
        lines = (c.stage_dir("ppo") / "log_history.jsonl").read_text().splitlines()
        return {r["train/global_step"]: r for r in map(json.loads, lines) if "ppo/score" in r}

    resumed, uninterrupted = rows(cfg), rows(reference)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):  # same prompts, sampling noise, corpus blocks, optimizer state and β
        for key in ("ppo/score", "ppo/kl", "ppo/policy_loss", "ppo/ptx_loss"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-4, abs=1e-6), (step, key)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_prompts_and_missing_reward_model_fail_with_one_clear_message(
    tmp_path: Path, sft_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "count to two\\n"}\n{"text": "no prompt here"}\n')
    run = tmp_path / "runs"
    code = main(["ppo", "--config", "configs/tiny.yaml", f"run_dir={run}", f"ppo.data.train={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and "prompts.jsonl" in err and "row 2" in err and "Traceback" not in err
    assert not (run / "ppo").exists()

    code = main(["ppo", "--config", "configs/tiny.yaml", f"run_dir={run}", f"ppo.init={sft_dir}"])
    assert code == 2 and "make rm PROFILE=tiny" in capsys.readouterr().err


def test_minibatch_that_does_not_divide_the_rollout_batch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"ppo.minibatch_size \(24\) must divide ppo.rollout_batch_size \(64\)"):
        load_config("configs/tiny.yaml", ["ppo.minibatch_size=24"])


def test_two_processes_split_the_rollouts_gather_the_evaluation_and_write_once(
    make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc_per_node 2`: DDP over gloo wraps policy and value model; each process samples its
    half of the prompts; the held-out evaluation is gathered (every sample once); only rank 0 writes."""
    import sys

    cfg = make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}", "ppo.iterations=2", "ppo.eval_prompts=5",
                      run_dir=tmp_path / "two")
    overrides = [f"run_dir={cfg.run_dir}", f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}",
                 f"pretrain.data.train={cfg.pretrain.data.train}", f"pretrain.data.eval={cfg.pretrain.data.eval}",
                 "ppo.iterations=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                 "ppo.max_new_tokens=6", "ppo.eval_prompts=5", "ppo.eval_samples_per_prompt=2", "ppo.ptx_batch_size=2",
                 "ppo.ptx_block_size=32", "ppo.eval_corpus_blocks=3", "ppo.eval_steps=null", "tracking.wandb=false"]
    proc = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
         "-m", "pipeline", "ppo", "--config", "configs/tiny.yaml", *overrides], timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg.run_dir) / "ppo"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 * 2  # 10 held-out samples split 5 + 5 and gathered, none twice or lost
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [r["train/global_step"] for r in history if "ppo/score" in r] == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
    assert not (Path(cfg.run_dir) / "ppo.partial").exists()
