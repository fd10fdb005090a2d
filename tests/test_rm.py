"""The reward-model stage: per-prompt batching, metrics, normalization, the output's loading, data formats."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from pipeline.__main__ import main
from pipeline.config import Config, ConfigError, TokenizerConfig
from pipeline.data import DataError
from pipeline.modeling import (
    ModelLoadError,
    build_tiny_tokenizer,
    compute_rewards,
    ensure_distinct_pad,
    shift_reward,
)
from pipeline.ranking import Ranking, RankingCollator, encode_rankings, fit, ranking_metrics
from pipeline.stages import rm
from tests.conftest import run_group

# ------------------------------------------------------------------------------------------ batching


def test_collator_puts_whole_prompts_in_one_batch_with_offset_pairs() -> None:
    a = Ranking("p", ["a", "b", "c", "d"], [1, 2, 2, 3], [[5, 6, 0], [5, 7, 0], [5, 0], [5, 8, 9, 0]],
                [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)])
    b = Ranking("q", ["x", "y"], [2, 1], [[4, 0], [4, 3, 3, 3, 0]], [(1, 0)])
    batch = RankingCollator(pad_token_id=1)([a, b])
    assert batch["input_ids"].shape == (6, 5)  # 4 + 2 completions, padded to the longest (5 tokens)
    assert batch["input_ids"][2].tolist() == [5, 0, 1, 1, 1]  # right padding with the pad id
    assert batch["attention_mask"][2].tolist() == [1, 1, 0, 0, 0]
    assert batch["completion_group"].tolist() == [0, 0, 0, 0, 1, 1]
    assert batch["ranks"].tolist() == [1, 2, 2, 3, 2, 1]
    # b's pair (1, 0) becomes (5, 4): indices into the flat batch of completions.
    assert batch["pairs"].tolist() == [[0, 1], [0, 2], [0, 3], [1, 3], [2, 3], [5, 4]]
    assert batch["pair_group"].tolist() == [0, 0, 0, 0, 0, 1]
    assert "group_weight" not in batch  # every prompt weighs 1: the plain mean over prompts
    b.weight = 4.0
    assert RankingCollator(pad_token_id=1)([a, b])["group_weight"].tolist() == [1.0, 4.0]


def test_fit_cuts_the_prompt_start_first_and_always_keeps_the_eos() -> None:
    eos = 0
    assert fit([1, 2, 3], [4, 5], eos, 10) == ([1, 2, 3, 4, 5, 0], False)
    assert fit([1, 2, 3], [4, 5], eos, 4) == ([3, 4, 5, 0], True)
    assert fit([1, 2, 3], [4, 5, 6, 7, 8], eos, 4) == ([4, 5, 6, 0], True)
    # A prompt that fits whole stays whole, however close to max_length (room between len and 2 * len)
    assert fit([1, 2, 3, 4, 5, 6, 7], [8, 9], eos, 12) == ([1, 2, 3, 4, 5, 6, 7, 8, 9, 0], False)
    ids, cut = fit(list(range(300)), list(range(1000, 1200)), eos, 512)
    assert (len(ids), cut) == (501, False)


# ------------------------------------------------------------------------------------------ metrics


def test_ranking_metrics_by_hand() -> None:
    rewards = [[3.0, 1.0, 2.0, 0.0], [0.0, 1.0]]
    ranks = [[1, 2, 2, 3], [1, 2]]
    golds = [[1.0, 0.5, 0.5, 0.0], [1.0, 0.0]]
    m = ranking_metrics(rewards, ranks, golds)
    # Prompt 1's 5 pairs are all ordered right; prompt 2's one pair is wrong: 5 / 6.
    assert m["pairwise_acc"] == pytest.approx(5 / 6)
    assert m["rank1_acc"] == pytest.approx(1 / 2)  # prompt 1's argmax has rank 1, prompt 2's does not
    assert m["rank1_chance"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert m["gold_agreement"] == pytest.approx(5 / 6)
    assert m["gold_agreement_per_prompt"] == pytest.approx((5 / 5 + 0 / 1) / 2)  # each prompt weighs the same
    assert m["reward_mean"] == pytest.approx(7 / 6)


# ------------------------------------------------------------------------------------------ model


def _tiny_rm(**config: int) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=1, pad_token_id=1,
                     **config)
    return GPT2ForSequenceClassification(cfg).eval()


BATCH = {
    "input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 1]]),  # 0 = EOS, 1 = pad (right padding)
    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
}


def test_reward_is_read_at_the_eos_not_at_the_padding() -> None:
    model = _tiny_rm()
    with torch.no_grad():
        r = compute_rewards(model, **BATCH)
        alone = compute_rewards(model, torch.tensor([[8, 9, 0]]), torch.tensor([[1, 1, 1]]))
    assert float(r[1]) == pytest.approx(float(alone[0]), abs=1e-5)


@pytest.mark.parametrize("variant", ["final_norm_bias", "head_bias", "config.reward_shift"])
def test_shift_reward_moves_every_reward_by_exactly_the_shift(variant: str) -> None:
    model = _tiny_rm()
    if variant == "head_bias":
        biased = torch.nn.Linear(16, 1, bias=True)
        biased.weight.data = model.score.weight.data.clone()
        biased.bias.data.zero_()
        model.score = biased
    if variant == "config.reward_shift":  # an RMSNorm-like final norm with no bias, and no head bias
        norm = torch.nn.LayerNorm(16, bias=False)
        norm.weight.data = model.transformer.ln_f.weight.data.clone()
        model.transformer.ln_f = norm
    before = compute_rewards(model, **BATCH)
    assert shift_reward(model, 0.7) == variant
    after = compute_rewards(model, **BATCH)
    assert (after - before).tolist() == pytest.approx([-0.7, -0.7], abs=1e-5)


def test_a_pad_token_equal_to_eos_is_replaced_for_the_reward_model(small_data: dict[str, Path]) -> None:
    tokenizer = build_tiny_tokenizer(TokenizerConfig(train_data=str(small_data["corpus_train"]), vocab_size=600))
    tokenizer.pad_token = tokenizer.eos_token  # as GPT-2 checkpoints come
    model = _tiny_rm()
    model.resize_token_embeddings(len(tokenizer))
    ensure_distinct_pad(model, tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id < model.get_input_embeddings().num_embeddings


# ------------------------------------------------------------------------------------------ stage


def test_rm_output_loads_as_a_scalar_sequence_classifier_and_its_reward_is_normalized(
    make_config: Callable[..., Config], sft_dir: Path
) -> None:
    # rm.policy_samples names a policy whose held-out samples the RM is checked on (here the SFT policy again)
    cfg = make_config(f"rm.init={sft_dir}", "rm.eval_steps=3", f"rm.policy_samples={sft_dir}")
    metrics = rm.run(cfg)
    assert metrics["eval/gold_agreement_policy_samples"] == metrics["eval/gold_agreement_sft_samples"]
    assert 0 <= metrics["eval/gold_agreement_sft_samples_pooled"] <= 1  # and over all pairs, the pooled number
    out = cfg.stage_dir("rm")
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval/pairwise_acc", "eval/rank1_acc", "eval/rank1_chance", "eval/gold_agreement", "eval/loss",
                "eval/pairwise_acc_init", "rm/demo_reward_mean"):
        assert key in summary["metrics"], key
    assert summary["metrics"]["train/global_step"] == 6
    # Held-out accuracy during training (every rm.eval_steps) is in the log history, for the report.
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "eval_pairwise_acc" in r] == [3, 6]
    # Normalized: the held-out demonstrations (sft.data.eval) average a reward of 0.
    assert abs(metrics["rm/demo_reward_mean"]) < 1e-4
    assert summary["normalization"]["method"] == "final_norm_bias"
    assert summary["normalization"]["shift"] == pytest.approx(metrics["rm/demo_reward_mean_before_shift"])

    # A plain transformers user gets the same (normalized) rewards as scores.jsonl records.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id != tokenizer.eos_token_id
    row = json.loads((out / "scores.jsonl").read_text().splitlines()[0])
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    texts = [prompt_ids + tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
             for c in row["completions"]]
    with torch.no_grad():
        rewards = [float(model(torch.tensor([ids])).logits[0, 0]) for ids in texts]
    assert rewards == pytest.approx(row["rewards"], abs=1e-3)
    assert len(row["completions"]) == len(row["ranks"]) == len(row["gold"]) == 4


class Interrupt(Exception):
    pass


def test_interrupted_rm_resumes_from_its_checkpoint(make_config: Callable[..., Config], sft_dir: Path) -> None:
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:  # after checkpoint-2, before checkpoint-4 is written
                raise Interrupt

    cfg = make_config(f"rm.init={sft_dir}", "rm.save_steps=2")
    with pytest.raises(Interrupt):
        rm.run(cfg, callbacks=[StopAt()])
    assert not cfg.stage_dir("rm").exists()  # nothing half-written in the finished place
    metrics = rm.run(cfg)
    summary = json.loads((cfg.stage_dir("rm") / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and metrics["train/global_step"] == 6


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_k5_with_ties_pairwise_and_hh_rlhf_files_each_train(tmp_path: Path, sft_dir: Path) -> None:
    base = [json.loads(line) for line in Path("data/tiny/rankings.train.jsonl").read_text().splitlines()[:48]]
    # K = 5 with ties: the shipped K = 4 rows plus an off-task answer ranked last.
    k5 = _write(tmp_path / "k5.jsonl", [
        {"prompt": r["prompt"], "completions": [*r["completions"], "hello there"], "ranks": [*r["ranks"], 9]}
        for r in base
    ])
    best_worst = [(r["prompt"], r["completions"][r["ranks"].index(min(r["ranks"]))],
                   r["completions"][r["ranks"].index(max(r["ranks"]))]) for r in base]
    pairwise = _write(tmp_path / "pairwise.jsonl", [{"prompt": p, "chosen": c, "rejected": w} for p, c, w in best_worst])
    hh = _write(tmp_path / "hh.jsonl", [
        {"chosen": f"\n\nHuman: {p.strip()}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p.strip()}\n\nAssistant: {w}"}
        for p, c, w in best_worst
    ])
    for name, path, extra in (("k5", k5, []), ("pairwise", pairwise, []), ("hh", hh, ["gold_reward=null"])):
        run = tmp_path / name
        code = main(["rm", "--config", "configs/tiny.yaml", f"run_dir={run}", f"rm.init={sft_dir}",
                     f"rm.data.train={path}", f"rm.data.eval={path}", "rm.max_steps=3", "rm.batch_size=8",
                     "rm.num_table_prompts=2", *extra])
        assert code == 0, name
        summary = json.loads((run / "rm" / "summary.json").read_text())
        k = 5 if name == "k5" else 2
        row = json.loads((run / "rm" / "scores.jsonl").read_text().splitlines()[0])
        assert len(row["completions"]) == k, name
        assert 0.0 <= summary["metrics"]["eval/pairwise_acc"] <= 1.0
        assert summary["metrics"]["eval/rank1_chance"] <= (0.5 if k == 2 else 0.4)


def test_rm_bad_input_and_missing_sft_fail_with_one_clear_message(
    make_config: Callable[..., Config], tmp_path: Path, sft_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tied = _write(tmp_path / "tied.jsonl", [{"prompt": "count to two\n", "completions": ["one two", "two"], "ranks": [1, 2]},
                                           {"prompt": "count to one\n", "completions": ["one", "two"], "ranks": [1, 1]}])
    with pytest.raises(DataError, match=r"tied\.jsonl, row 2"):
        rm.run(make_config(f"rm.init={sft_dir}", f"rm.data.train={tied}"))
    with pytest.raises(ModelLoadError, match=r"no finished model at .*sft: build it with `make sft"):
        rm.run(make_config(run_dir=tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"'rm\.max_length' \(512\) exceeds the model's context"):
        rm.run(make_config(f"rm.init={sft_dir}", "rm.max_length=512"))
    with pytest.raises(ConfigError, match=r"rm\.policy_samples: .* has no samples\.jsonl"):
        rm.run(make_config(f"rm.init={sft_dir}", f"rm.policy_samples={tmp_path}"))
    assert main(["rm", "--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'cli'}", f"rm.data.train={tied}"]) == 2
    assert "tied.jsonl, row 2" in capsys.readouterr().err


def test_two_processes_score_every_held_out_prompt_once(make_config: Callable[..., Config], sft_dir: Path,
                                                        tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2`: the held-out rankings are split across processes and gathered, so the
    untrained head's metrics equal the single-process ones exactly (41 prompts: the shards are uneven)."""
    import sys

    rankings = Path(make_config().rm.data.eval)
    eval41 = _write(tmp_path / "eval41.jsonl", [json.loads(line) for line in rankings.read_text().splitlines()] * 2)
    eval41.write_text("".join(eval41.read_text().splitlines(keepends=True)[:41]))
    common = [f"rm.init={sft_dir}", f"rm.data.eval={eval41}", "rm.max_steps=2", "rm.batch_size=4"]
    one = make_config(*common, run_dir=tmp_path / "one")
    rm.run(one)
    overrides = [f"{k}={v}" for k, v in (
        ("run_dir", tmp_path / "two"), ("rm.data.train", one.rm.data.train), ("sft.data.eval", one.sft.data.eval),
    )] + common
    proc = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         "-m", "pipeline", "rm", "--config", "configs/tiny.yaml", *overrides], timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "rm" / "summary.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "two" / "rm" / "summary.json").read_text())["metrics"]
    for key in ("eval/pairwise_acc_init", "eval/rank1_acc_init", "eval/loss_init", "eval/reward_mean_init"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key
    assert m2["train/global_step"] == 2 and not (tmp_path / "two" / "rm.partial").exists()


def test_extra_train_sources_join_the_training_rankings_and_the_stamp(
    make_config: Callable[..., Config], tmp_path: Path, sft_dir: Path
) -> None:
    """rm.extra_train: each round's rankings of its policy's samples train together with rm.data.train."""
    extra = _write(tmp_path / "round-2.jsonl", [
        {"prompt": "count to two\n", "completions": ["one two", "two", "one"], "ranks": [1, 3, 2], "labeler": "gold"},
    ])
    base = make_config()
    cfg = make_config(f"rm.extra_train=[{extra}]")
    train, _, _, _ = rm.load_data(cfg)
    base_train, _, _, _ = rm.load_data(base)
    assert len(train) == len(base_train) + 1 and train[-1]["completions"] == ["one two", "two", "one"]
    from pipeline.config import data_sources
    assert [s.key for s in data_sources(cfg, "rm")][:3] == ["rm.data.train", "rm.data.eval", "rm.extra_train[0]"]
    # rm.extra_weight: the extra rankings weigh that much in the loss, the profile's keep 1.
    weighted, _, _, _ = rm.load_data(make_config(f"rm.extra_train=[{extra}]", "rm.extra_weight=4"))
    tok = AutoTokenizer.from_pretrained(sft_dir)
    encoded = encode_rankings(weighted, tok, 64, "rm.data.train")
    assert [x.weight for x in encoded] == [1.0] * len(base_train) + [4.0]
    assert {x.weight for x in encode_rankings(train, tok, 64, "rm.data.train")} == {1.0}
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completions": ["a", "b"], "ranks": [1]}])
    with pytest.raises(DataError, match=r"bad\.jsonl, row 1, field 'ranks'"):
        rm.load_data(make_config(f"rm.extra_train=[{extra},{bad}]"))
