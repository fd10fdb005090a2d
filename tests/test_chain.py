"""The real chain: the shipped tiny profile through the CLI (pretrain → sft → rm → ppo, ~4 min on 2 cores).

This is the run `make ppo` does, written to a temp directory, with PPO shortened. It checks the recipe's
promises: SFT makes the model better at the task than continued pretraining alone, on held-out data, by the
task's own loss and by the gold reward of sampled completions; the reward model trained on its outputs
ranks held-out completions like the labels do; and PPO against that reward model raises the gold score of
held-out prompts above the SFT policy's, without being told the gold reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import main
from pipeline.tinytask import gold_score

PPO_SHORT = ("ppo.iterations=60", "ppo.eval_steps=null")  # the profile runs 120 iterations


def test_tiny_profile_sft_beats_pretrain_the_reward_model_ranks_and_ppo_beats_sft_on_gold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs"
    for stage in ("pretrain", "sft"):
        assert main([stage, "--config", "configs/tiny.yaml", f"run_dir={run}"]) == 0

    pre = json.loads((run / "pretrain" / "summary.json").read_text())["metrics"]
    assert pre["eval/loss"] < 2.0, pre  # the corpus is learnable: a fresh model starts near ln(vocab) ≈ 6.5

    m = json.loads((run / "sft" / "summary.json").read_text())["metrics"]
    # Same held-out demonstrations, same completion-only loss: the pretrain model vs the SFT model.
    assert m["eval/loss"] < m["eval/loss_init"] - 1.0, m
    # Sampled completions of held-out prompts, scored by the gold reward.
    assert m["eval/gold_score"] > m["eval/gold_score_init"] + 0.3, m
    assert m["eval/eos_rate"] > 0.9, m
    # `make summary` prints these numbers.
    capsys.readouterr()
    assert main(["summary", "--config", "configs/tiny.yaml", f"run_dir={run}"]) == 0
    printed = capsys.readouterr().out
    assert f"eval/gold_score                  {m['eval/gold_score']:.4f}" in printed

    # The output is a plain Hugging Face directory that generates answers the gold reward recognises.
    model = AutoModelForCausalLM.from_pretrained(run / "sft")
    tok = AutoTokenizer.from_pretrained(run / "sft")
    prompt = "count to three\n"
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    completion = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert gold_score(prompt, completion) > 0.0, completion

    # The reward model, started from that SFT model: held-out pairwise accuracy at least 0.80 and the
    # rank-1 completion picked far more often than chance.
    assert main(["rm", "--config", "configs/tiny.yaml", f"run_dir={run}"]) == 0
    rm = json.loads((run / "rm" / "summary.json").read_text())["metrics"]
    assert rm["eval/pairwise_acc"] >= 0.80, rm
    assert rm["eval/rank1_acc"] > rm["eval/rank1_chance"] + 0.25, rm
    assert rm["eval/pairwise_acc_init"] < 0.7, rm  # the fresh head is near chance: training did this
    assert rm["eval/gold_agreement_sft_samples"] > 0.6, rm  # it also orders the SFT policy's own samples

    # PPO-ptx, shortened: held-out gold above the SFT policy's (measured on the same prompts and seeds).
    assert main(["ppo", "--config", "configs/tiny.yaml", f"run_dir={run}", *PPO_SHORT]) == 0
    p = json.loads((run / "ppo" / "summary.json").read_text())["metrics"]
    assert p["eval/gold_score"] > p["eval/gold_score_init"] + 0.02, p
    assert p["eval/score"] > p["eval/score_init"], p  # the proxy it optimized rose too
    assert 0.05 < p["eval/kl_to_sft"] < 3.0, p  # it moved, and stayed near the SFT policy
