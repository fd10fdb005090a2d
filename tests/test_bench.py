"""The benchmarks run (their speed goals live in their output, never in a timed test).

`make bench` compares with TRL 1.12 in a venv of its own; these tests need none: they run OUR side of each
bench on tiny settings, check that the two sides are configured alike (a pure function), and that the
report's arithmetic (medians, ratios, the equal-token check) is right.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run as bench_run  # noqa: E402
from settings import PPOBench, SFTBench, ppo_settings, sft_settings  # noqa: E402

from pipeline.config import load_config  # noqa: E402


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


@pytest.mark.parametrize("s", [PPOBench(), PPOBench(iterations=3, rollout_batch_size=32, minibatch_size=8,
                                                     ppo_epochs=2, max_new_tokens=16, ptx_coef=1.0)])
def test_ppo_settings_give_both_trainers_the_same_run(s: PPOBench, tmp_path: Path) -> None:
    ours, trl = ppo_settings(s, str(tmp_path), "init", "rm")
    cfg = load_config(ROOT / "configs/tiny.yaml", ours)  # every override is a real, valid key
    p = cfg.ppo
    assert (p.iterations, p.rollout_batch_size, p.minibatch_size, p.ppo_epochs, p.max_new_tokens) == (
        s.iterations, s.rollout_batch_size, s.minibatch_size, s.ppo_epochs, s.max_new_tokens)
    assert p.eval_steps is None and p.ptx_coef == s.ptx_coef and p.target_kl is None and not p.whiten_rewards
    # TRL 1.12's batch arithmetic (PPOTrainer.__init__ / train): rollout = per_device × grad_accum (1 process),
    # minibatch = rollout / num_mini_batches, micro-batch = min(per_device, minibatch), one optimizer step
    # per grad_accum micro-batches, total iterations = ceil(total_episodes / rollout).
    rollout = trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"]
    minibatch = rollout // trl["num_mini_batches"]
    micro = min(trl["per_device_train_batch_size"], minibatch)
    steps_per_iteration = trl["num_ppo_epochs"] * trl["num_mini_batches"] * (minibatch // micro) \
        // trl["gradient_accumulation_steps"]
    assert rollout == p.rollout_batch_size and minibatch == p.minibatch_size
    assert -(-trl["total_episodes"] // rollout) == p.iterations
    assert steps_per_iteration * p.iterations == s.optimizer_steps
    assert steps_per_iteration == p.ppo_epochs * (p.rollout_batch_size // p.minibatch_size)
    assert trl["response_length"] == p.max_new_tokens and trl["local_rollout_forward_batch_size"] == rollout
    assert (trl["kl_coef"], trl["missing_eos_penalty"], trl["vf_coef"], trl["cliprange"], trl["cliprange_value"],
            trl["gamma"], trl["lam"], trl["learning_rate"], trl["temperature"]) == (
        p.kl_coef, p.missing_eos_penalty, p.vf_coef, p.clip_range, p.clip_range_value, p.gamma, p.lam, p.lr,
        p.temperature)
    assert trl["stop_token"] == "eos" and not trl["bf16"] and not trl["gradient_checkpointing"]
    assert trl["num_sample_generations"] == 0 and trl["kl_estimator"] == "k1"


def test_ppo_settings_refuse_a_minibatch_that_does_not_divide_the_rollout() -> None:
    with pytest.raises(ValueError, match="must divide"):
        ppo_settings(PPOBench(rollout_batch_size=64, minibatch_size=24), "d", "i", "r")


def test_sft_settings_give_both_trainers_the_same_run(tmp_path: Path) -> None:
    s = SFTBench()
    ours, trl = sft_settings(s, str(tmp_path), "init", "data/tiny/demos.train.jsonl")
    cfg = load_config(ROOT / "configs/tiny.yaml", ours).sft
    assert (cfg.batch_size, cfg.max_length, cfg.lr, cfg.epochs, cfg.lr_scheduler, cfg.warmup_ratio) == (
        trl["per_device_train_batch_size"], trl["max_length"], trl["learning_rate"], trl["num_train_epochs"],
        trl["lr_scheduler_type"], trl["warmup_steps"])
    assert trl["completion_only_loss"] is True and trl["packing"] is False and cfg.packing is False
    assert cfg.data.eval is None and cfg.generation.num_prompts == 0
    ours, trl = sft_settings(SFTBench(packing=True), str(tmp_path), "init", "data/tiny/demos.train.jsonl")
    assert trl["packing"] is True and load_config(ROOT / "configs/tiny.yaml", ours).sft.packing is True


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import assets as bench_assets

    return bench_assets.build(tmp_path_factory.mktemp("bench") / "assets", demo_rows=256)


def bench_line(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    return json.loads(lines[0][len("BENCH "):])


def test_the_bench_policy_never_ends_early(assets: Path) -> None:
    """The bench's tiny policy puts EOS and pad ~100 logits below every other token (bench/assets.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(assets / "policy"), AutoTokenizer.from_pretrained(assets / "policy")
    for prompt in ("count to three\n", "list four animals\n"):  # unpadded: every position is a real one
        logits = model(**tok(prompt, return_tensors="pt")).logits[0]
        others = logits.clone()
        others[:, [tok.eos_token_id, tok.pad_token_id]] = torch.inf
        lowest_other = others.min(-1).values
        assert (logits[:, tok.eos_token_id] < lowest_other - 50).all()
        assert (logits[:, tok.pad_token_id] < lowest_other - 50).all()


def test_our_ppo_bench_times_full_length_episodes(assets: Path) -> None:
    r = bench_line([sys.executable, "bench/ours.py", "ppo", "--assets", str(assets), "--iterations", "2"])
    s = PPOBench()
    assert r["stage"] == "ppo" and r["side"] == "ours" and not r["ptx"]
    assert r["episodes"] == s.rollout_batch_size  # iteration 2 only: the first is the warm-up
    assert r["tokens"] == r["expected_tokens"] == s.rollout_batch_size * s.max_new_tokens
    assert r["seconds"] > 0 and r["episodes_per_s"] == pytest.approx(r["episodes"] / r["seconds"])
    assert 0 < r["opt_seconds"] < r["seconds"]
    assert r["optimizer_steps"] == r["expected_steps"] == 2 * s.ppo_epochs * s.rollout_batch_size // s.minibatch_size
    # The optimization FLOPs by hand: 6 × (policy + value matmul params) × tokens of 4 epochs over the rollout.
    d, v, seq = r["n_embd"], r["vocab"], r["minibatch_seq"][1]
    block = 4 * 12 * d * d
    assert r["opt_flops"] == 6 * (block + v * d + block + d) * s.rollout_batch_size * seq * s.ppo_epochs
    assert r["matmul_flops_per_s"] > 0 and r["opt_flops_per_s"] > 0 and r["peak_rss_mib"] > 100


def test_our_sft_bench_counts_the_tokens_it_trains_on(assets: Path) -> None:
    r = bench_line([sys.executable, "bench/ours.py", "sft", "--assets", str(assets), "--sft-data",
                    "demos.quick.jsonl"])
    rows = [json.loads(line) for line in (assets / "demos.quick.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    # Each row: prompt + completion + EOS, at most max_length tokens; at least one token per row beyond the prompt.
    assert 32 * 3 < r["tokens"] <= 32 * SFTBench().max_length
    assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert r["optimizer_steps"] == 1  # 32 rows, batch 32, one epoch
    packed = bench_line([sys.executable, "bench/ours.py", "sft", "--assets", str(assets), "--sft-data",
                         "demos.quick.jsonl", "--packing"])
    assert packed["tokens"] == r["tokens"]  # the same tokens, side by side in fewer rows: no padding counted
    assert packed["optimizer_steps"] == 1


def test_rm_throughput_benchmark_trains_both_and_prints_the_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/rm_throughput.py", "--prompts", "24", "--batch-prompts", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "24 prompts with K = 4" in out
    ours = float(re.search(r"this project:\s+([\d.]+) comparisons/s", out).group(1))
    trl = float(re.search(r"TRL RewardTrainer:\s+([\d.]+) comparisons/s", out).group(1))
    ratio = float(re.search(r"ratio:\s+([\d.]+)x", out).group(1))
    assert ours > 0 and trl > 0 and abs(ratio - ours / trl) < 0.01 * ratio + 0.01


def test_rm_bench_side_prints_one_bench_line() -> None:
    r = bench_line([sys.executable, "bench/rm_throughput.py", "--prompts", "16", "--batch-prompts", "8",
                    "--side", "ours"])
    assert r["stage"] == "rm" and r["side"] == "ours" and r["comparisons_per_s"] > 0 and r["comparisons"] > 16


def test_report_takes_medians_and_flags_unequal_token_counts() -> None:
    def ppo(eps: float, tokens: int, rss: float) -> dict:
        return {"episodes_per_s": eps, "tokens_per_s": eps * 24, "peak_rss_mib": rss, "tokens": tokens,
                "expected_tokens": 1536, "episodes": 64, "optimizer_steps": 96 if rss != 720 else 80,
                "expected_steps": 96}

    results = {"ppo": {"ours": [ppo(e, 1536, 700) for e in (10, 30, 20)],
                       "trl": [ppo(e, 1536 if e != 8 else 1500, r) for e, r in ((8, 650), (10, 720), (12, 700))]}}
    rows = bench_run.table(results)
    assert rows[0]["ours"] == 20 and rows[0]["trl"] == 10 and rows[0]["ratio"] == 2.0
    assert rows[0]["ratio_best"] == 30 / 12  # the fastest run of each side
    assert rows[0]["rss_ours_mib"] == 700 and rows[0]["rss_trl_mib"] == 720  # the largest peak of each side
    assert rows[1]["unit"] == "gen. tokens/s" and rows[1]["ratio"] == 2.0
    results["sft"] = {"ours": [{"optimizer_steps": 32}] * 2, "trl": [{"optimizer_steps": 32}, {"optimizer_steps": 31}]}
    results["sft_packed"] = {"ours": [{"optimizer_steps": 7}] * 2, "trl": [{"optimizer_steps": 7}] * 2}
    checks = bench_run.token_checks(results)
    assert "all completions at full length" in checks[0] and "96 optimizer steps per run" in checks[1]
    assert "UNEQUAL completions" in checks[2] and "UNEQUAL optimizer steps" in checks[3]
    assert checks[4].startswith("SFT: UNEQUAL")
    assert checks[5].startswith("SFT (packed): the same optimizer steps on both sides")


def test_report_shows_peak_gpu_memory_only_for_gpu_runs() -> None:
    def ppo(eps: float, gpu: float | None) -> dict:
        r = {"episodes_per_s": eps, "tokens_per_s": eps * 24, "peak_rss_mib": 700, "tokens": 1536,
             "expected_tokens": 1536, "episodes": 64}
        return r if gpu is None else {**r, "peak_gpu_mib": gpu, "gpu": "NVIDIA H200"}

    doc = {"roofline": None, "checks": [], "date": "2026-12-02 16:00 UTC", "repeats": 2, "quick": False,
           "machine": {"cpu": "x", "cores": 2, "torch_threads": 2}}
    cpu = bench_run.report({**doc, "table": bench_run.table({"ppo": {"ours": [ppo(20, None)] * 2,
                                                                     "trl": [ppo(10, None)] * 2}})})
    assert "GPU" not in cpu  # a CPU run's table keeps its columns
    rows = bench_run.table({"ppo": {"ours": [ppo(20, 900), ppo(22, 950)], "trl": [ppo(10, 1200), ppo(9, 1100)]}})
    assert rows[0]["gpu_ours_mib"] == 950 and rows[0]["gpu_trl_mib"] == 1200  # the largest peak of each side
    text = bench_run.report({**doc, "machine": {**doc["machine"], "gpu": "NVIDIA H200"}, "table": rows})
    header, line = text.splitlines()[:2]
    assert header.split()[-4:] == ["GPU", "ours", "GPU", "TRL"]
    assert line.split()[-4:] == ["950", "MiB", "1200", "MiB"] and "GPU NVIDIA H200" in text


def test_emit_adds_peak_gpu_memory_only_after_gpu_work(capsys: pytest.CaptureFixture[str]) -> None:
    import settings

    settings.emit({"stage": "ppo"})
    line = json.loads(capsys.readouterr().out.removeprefix("BENCH "))
    assert line["peak_rss_mib"] > 0
    assert ("peak_gpu_mib" in line) == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_a_peer_trl_other_than_the_pinned_one_is_flagged() -> None:
    run = {"episodes_per_s": 10, "tokens_per_s": 240, "peak_rss_mib": 600, "tokens": 1536, "expected_tokens": 1536,
           "episodes": 64}
    pinned = {"ppo": {"ours": [run], "trl": [{**run, "trl": "1.12.0"}]}}
    assert not any("NOT the pinned" in c for c in bench_run.token_checks(pinned))
    other = {"ppo": {"ours": [run], "trl": [{**run, "trl": "1.11.0"}]}}
    assert "PPO trl: TRL 1.11.0, NOT the pinned 1.12.0" in bench_run.token_checks(other)
    assert bench_run.peer_trl_versions(other) == "1.11.0"


def test_peer_python_replaces_the_peer_venv(tmp_path: Path) -> None:
    args = argparse.Namespace(only=["ppo"], assets=tmp_path, iterations=2, quick=True)
    plan = bench_run.jobs(args, Path("/opt/python3"))
    assert plan["ppo"][-1] == ("trl", ["/opt/python3", "bench/peer.py", "ppo", "--assets", str(tmp_path),
                                       "--iterations", "2"])
    sft_plan = bench_run.jobs(argparse.Namespace(**{**vars(args), "only": ["sft"]}), Path("/opt/python3"))
    assert [side for side, _ in sft_plan["sft_packed"]] == ["ours", "trl"]
    assert all(cmd[-1] == "--packing" for _, cmd in sft_plan["sft_packed"])
    assert all("--packing" not in cmd for _, cmd in sft_plan["sft"])


def test_checks_give_the_share_of_trl_time_in_gc_collect() -> None:
    run = {"episodes_per_s": 10, "tokens_per_s": 240, "peak_rss_mib": 600, "tokens": 1536, "expected_tokens": 1536,
           "episodes": 64}
    trl = [{**run, "seconds": 10.0, "gc_seconds": g} for g in (2.0, 2.5, 3.0)]
    checks = bench_run.token_checks({"ppo": {"ours": [run], "trl": trl}})
    assert any(c.startswith("PPO trl: gc.collect() took 25 % of TRL's timed seconds") for c in checks)
