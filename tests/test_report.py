"""`make report`: plots and an HTML page from the stages' own files — a real small run, and synthetic RM and PPO
logs in the metric names those stages will write."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from pipeline.__main__ import main
from pipeline.config import Config, load_config
from pipeline.report import load_rounds, load_stages, rounds_lines, write_report
from pipeline.stages import pretrain, sft

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_stage(run_dir: Path, stage: str, metrics: dict[str, Any], history: list[dict[str, Any]],
                samples: list[dict[str, Any]] | None = None) -> None:
    d = run_dir / stage
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"stage": stage, "metrics": metrics, "seed": 0, "wall_time_s": 12.5,
                                                "finished_at": "2026-01-01T00:00:00+0000"}))
    (d / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if samples is not None:
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))


def synthetic_run(run_dir: Path, with_later_stages: bool) -> None:
    """Log files shaped like the stages': Trainer rows (raw keys) and PPO rows already in ppo/* names."""
    write_stage(run_dir, "pretrain", {"train/loss": 2.0, "eval/loss": 2.1, "train/global_step": 20},
                [{"loss": 5.0 - 0.2 * s, "learning_rate": 1e-3, "epoch": s / 20, "step": s} for s in range(1, 21)]
                + [{"eval_loss": 2.1, "epoch": 1.0, "step": 20}])
    sft_samples = [{"prompt": "count to <three>\n", "completion": "one two three", "ended": True, "num_tokens": 4,
                    "gold": 1.0},
                   {"prompt": "count to <three>\n", "completion": "one two", "ended": True, "num_tokens": 3,
                    "gold": 0.5},
                   {"prompt": "list two colours\n", "completion": "red", "ended": False, "num_tokens": 8,
                    "gold": 0.25}]
    write_stage(run_dir, "sft", {"eval/loss": 0.8, "eval/loss_init": 5.2, "eval/gold_score": 0.7,
                                 "eval/gold_score_init": 0.01, "train/global_step": 10},
                [{"loss": 3.0 - 0.2 * s, "step": s} for s in range(1, 11)] + [{"eval_loss": 0.8, "step": 10}],
                sft_samples)
    if not with_later_stages:
        return
    write_stage(run_dir, "rm", {"eval/pairwise_acc": 0.9, "eval/loss": 0.3},
                [{"loss": 0.7 - 0.05 * s, "step": s} for s in range(1, 9)]
                + [{"eval_loss": 0.4, "eval_pairwise_acc": 0.8, "eval_rank1_acc": 0.6, "eval_gold_agreement": 0.85,
                    "step": s} for s in (4, 8)])
    write_stage(run_dir, "ppo", {"eval/gold_score": 0.85, "ppo/kl": 3.0},
                [{"ppo/score": 0.1 * s, "ppo/kl": 0.3 * s, "ppo/gold_score": 0.7 + 0.02 * s, "step": s}
                 for s in range(1, 11)] + [{"ppo/kl": math.nan, "step": 11}],  # a NaN row is skipped, not drawn
                [{"prompt": "count to <three>\n", "completion": "one two three four", "ended": True,
                  "num_tokens": 5, "gold": 0.5}])


LATER_PLOTS = {"rm_loss.png", "rm_accuracy.png", "ppo_reward.png", "ppo_kl.png", "ppo_frontier.png",
               "ppo_gold_vs_proxy.png"}


def report_config(run_dir: Path) -> Config:
    return load_config(ROOT / "configs/tiny.yaml", [f"run_dir={run_dir}"])


def test_report_draws_rm_and_ppo_plots_when_their_logs_exist(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    synthetic_run(run_dir, with_later_stages=True)
    page_path = write_report(report_config(run_dir))
    out = page_path.parent
    plots = {p.name for p in out.glob("*.png")}
    assert plots == {"pretrain_loss.png", "sft_loss.png", "gold_by_stage.png"} | LATER_PLOTS
    for name in plots:
        assert (out / name).read_bytes().startswith(PNG)
        assert matplotlib.image.imread(out / name).shape[2] in (3, 4)
    page = page_path.read_text()
    assert page.count("src='data:image/png;base64,") == len(plots)  # self-contained: plots embedded
    # The side-by-side table: the SFT and PPO completion of the same prompt in one row, HTML-escaped.
    row = next(r for r in page.split("<tr>") if "count to &lt;three&gt;" in r)
    assert "one two three</code>" in row and "one two three four</code>" in row
    assert "gold 0.75 over 2 samples" in row
    assert "[no EOS]" in page
    # The metrics table has a column per stage, in pipeline order.
    assert page.index("<th>pretrain</th>") < page.index("<th>sft</th>") < page.index("<th>rm</th>") < page.index(
        "<th>ppo</th>")
    stages = {s.name: s for s in load_stages(run_dir)}
    assert stages["rm"].series("eval/pairwise_acc") == ([4, 8], [0.8, 0.8])  # eval_pairwise_acc, renamed
    assert stages["ppo"].series("ppo/kl")[0] == list(range(1, 11))  # the NaN step dropped


def test_report_opens_with_a_headline_of_each_stages_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs"
    # pretrain without held-out data (its train loss stands in); an RM whose gold agreement is NaN; PPO on the toy
    # task with its starting policy's values as *_init.
    write_stage(run_dir, "pretrain", {"train/loss": 2.4567, "train/global_step": 20}, [])
    write_stage(run_dir, "sft", {"eval/loss": 0.814, "eval/loss_init": 5.236, "eval/gold_score": 0.74,
                                 "eval/gold_score_init": 0.007}, [])
    write_stage(run_dir, "rm", {"eval/pairwise_acc": 0.9154, "eval/pairwise_acc_init": 0.572,
                                "eval/gold_agreement": math.nan}, [])
    write_stage(run_dir, "ppo", {"eval/gold_score": 0.795, "eval/gold_score_init": 0.72, "eval/kl": 1.0712,
                                 "eval/score": 0.004, "eval/score_init": -0.554, "ppo/kl": 2.0}, [])
    page = write_report(report_config(run_dir)).read_text()
    expected = ["Pretrain: train loss 2.457",
                "SFT: held-out loss 5.236 → 0.814; held-out gold 0.007 → 0.740",
                "RM: held-out accuracy 0.572 → 0.915",
                "PPO: held-out gold 0.720 → 0.795 at KL 1.07; reward-model score -0.554 → 0.004"]
    assert page.count("<li>") == 4 and all(f"<li>{line}</li>" in page for line in expected)
    assert page.index("<h2>Headline</h2>") < page.index("<h2>Stages</h2>") < page.index("<h2>Final metrics</h2>")
    headline_html = page[page.index("<h2>Headline</h2>"):page.index("<h2>Stages</h2>")]
    assert "nan" not in headline_html.lower() and "gold agreement" not in headline_html and "perplexity" not in headline_html
    # The command prints the same lines under the report's path.
    assert main(["report", "--config", "configs/tiny.yaml", f"run_dir={run_dir}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:] == [f"  {line}" for line in expected]
    # Real data without a gold reward: PPO's reward-model score carries the KL; held-out pretrain data gives both numbers.
    for stage in ("pretrain", "ppo"):
        for f in (run_dir / stage).iterdir():
            f.unlink()
        (run_dir / stage).rmdir()
    write_stage(run_dir, "pretrain", {"train/loss": 2.5, "eval/loss": 2.1, "eval/perplexity": 8.166}, [])
    write_stage(run_dir, "ppo", {"eval/score": 0.5, "eval/kl": 3.0}, [])
    page = write_report(report_config(run_dir)).read_text()
    assert "<li>Pretrain: held-out loss 2.100; perplexity 8.17</li>" in page
    assert "<li>PPO: reward-model score 0.500 at KL 3.00</li>" in page


def test_report_of_pretrain_and_sft_only_has_no_rm_or_ppo_plots(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    synthetic_run(run_dir, with_later_stages=True)
    write_report(report_config(run_dir))
    for stage in ("rm", "ppo"):  # a re-run without those stages: their old plots must go
        for f in (run_dir / stage).iterdir():
            f.unlink()
        (run_dir / stage).rmdir()
    out = write_report(report_config(run_dir)).parent
    assert {p.name for p in out.glob("*.png")} == {"pretrain_loss.png", "sft_loss.png", "gold_by_stage.png"}
    assert "<th>ppo completion</th>" not in (out / "index.html").read_text()


def test_report_without_finished_stages_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no finished stage under {tmp_path / 'none'}: run `make sft PROFILE=tiny` first"


def test_report_of_a_corrupt_log_names_file_and_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs"
    synthetic_run(run_dir, with_later_stages=False)
    with open(run_dir / "sft" / "log_history.jsonl", "a") as f:
        f.write("{not json\n")
    assert main(["report", "--config", "configs/tiny.yaml", f"run_dir={run_dir}"]) == 2
    assert f"{run_dir / 'sft' / 'log_history.jsonl'}, row 12: not valid JSON" in capsys.readouterr().err


def test_report_of_a_real_small_run(make_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config("sft.eval_steps=3")
    pretrain.run(cfg)
    sft.run(cfg)
    capsys.readouterr()
    assert main(["report", "--config", "configs/tiny.yaml", f"run_dir={cfg.run_dir}"]) == 0
    out = Path(cfg.run_dir) / "report"
    assert f"report: {out / 'index.html'} (3 plots: gold_by_stage.png, pretrain_loss.png, sft_loss.png)" in (
        capsys.readouterr().out)
    for name in ("pretrain_loss.png", "sft_loss.png", "gold_by_stage.png"):
        assert (out / name).read_bytes().startswith(PNG)
    # The plotted series are the run's log_history rows, in the W&B names.
    rows = [json.loads(line) for line in (cfg.stage_dir("sft") / "log_history.jsonl").read_text().splitlines()]
    stage = {s.name: s for s in load_stages(Path(cfg.run_dir))}["sft"]
    assert stage.series("train/loss") == ([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r])
    assert stage.series("eval/loss")[0][0] == 3
    page = (out / "index.html").read_text()
    summary = json.loads((cfg.stage_dir("sft") / "summary.json").read_text())["metrics"]
    assert f"{summary['eval/gold_score']:.4g}" in page
    first = json.loads((cfg.stage_dir("sft") / "samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"].strip() in page


def test_report_after_a_real_ppo_run_draws_every_plot(small_pipeline: Config, capsys: pytest.CaptureFixture[str]) -> None:
    """`make report` after `make ppo`: the four stages' own logs, small but real."""
    capsys.readouterr()
    assert main(["report", "--config", "configs/tiny.yaml", f"run_dir={small_pipeline.run_dir}"]) == 0
    out = Path(small_pipeline.run_dir) / "report"
    printed = capsys.readouterr().out
    for name in ("pretrain_loss.png", "sft_loss.png", "rm_loss.png", "rm_accuracy.png", "ppo_reward.png", "ppo_kl.png",
                 "ppo_frontier.png", "ppo_gold_vs_proxy.png", "gold_by_stage.png"):
        assert (out / name).read_bytes().startswith(PNG), name
        assert name in printed
    stages = {s.name: s for s in load_stages(Path(small_pipeline.run_dir))}
    history = [json.loads(line) for line in (small_pipeline.stage_dir("ppo") / "log_history.jsonl").read_text().splitlines()]
    assert stages["ppo"].series("ppo/kl") == ([r["train/global_step"] for r in history if "ppo/kl" in r],
                                              [r["ppo/kl"] for r in history if "ppo/kl" in r])
    page = (out / "index.html").read_text()
    ppo_metrics = json.loads((small_pipeline.stage_dir("ppo") / "summary.json").read_text())["metrics"]
    assert f"{ppo_metrics['eval/gold_score']:.4g}" in page
    # The gold-by-stage bars end with PPO, and PPO's completions sit beside SFT's in the samples table.
    from pipeline.report import gold_by_stage

    # (PPO evaluates on its own held-out prompts, so the SFT policy's score there gets its own bar.)
    bars = dict(gold_by_stage(list(stages.values())))
    assert list(bars)[-3:] == ["sft", "ppo start", "ppo"]
    assert bars["ppo start"] == pytest.approx(ppo_metrics["eval/gold_score_init"])
    first = json.loads((small_pipeline.stage_dir("ppo") / "samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"].strip() in page and first["completion"] in page


def test_rounds_side_by_side_in_the_report_and_make_iterates_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round 1 is the chain; round-2/ is `make iterate`'s second round; oracle/ the gold-reward ceiling."""
    run_dir = tmp_path / "runs"
    synthetic_run(run_dir, with_later_stages=False)
    write_stage(run_dir, "rm", {"eval/pairwise_acc": 0.9, "eval/gold_agreement_sft_samples": 0.85}, [])
    write_stage(run_dir, "ppo", {"eval/gold_score": 0.79, "eval/gold_score_init": 0.72, "eval/kl_to_sft": 1.07}, [])
    write_stage(run_dir / "round-2", "label", {"rankings": 950, "comparisons": 4000, "rm_gold_agreement": 0.64}, [])
    write_stage(run_dir / "round-2", "rm", {"eval/gold_agreement_sft_samples": 0.86,
                                            "eval/gold_agreement_policy_samples": 0.88,
                                            "eval/gold_agreement_policy_samples_pooled": 0.66}, [])
    write_stage(run_dir / "round-2", "ppo", {"eval/gold_score": 0.87, "eval/gold_score_init": 0.72,
                                             "eval/kl_to_sft": 1.5}, [])
    write_stage(run_dir / "oracle", "ppo", {"eval/gold_score": 0.95, "eval/gold_score_init": 0.72,
                                            "eval/kl_to_sft": 2.5}, [])
    assert main(["rounds", "--config", "configs/tiny.yaml", f"run_dir={run_dir}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["round", "1", "-", "0.8500", "-", "-", "0.7900", "+0.0700", "1.070"]
    assert lines[2].split() == ["round", "2", "950", "0.8800", "0.6400", "0.6600", "0.8700", "+0.1500", "1.500"]
    assert lines[3].split() == ["oracle", "(gold", "reward)", "-", "-", "-", "-", "0.9500", "+0.2300", "2.500"]
    page = write_report(report_config(run_dir)).read_text()
    rounds = page[page.index("<h2>RLHF rounds</h2>"):page.index("<h2>Stages</h2>")]
    assert rounds.count("<tr>") == 4 and "+0.1500" in rounds and "oracle" in rounds
    # Without rounds there is no such section, and `rounds` says what to run.
    empty = tmp_path / "empty"
    assert main(["rounds", "--config", "configs/tiny.yaml", f"run_dir={empty}"]) == 2
    assert "make iterate" in capsys.readouterr().err


def test_rounds_gain_is_over_sft_even_when_a_round_starts_from_the_last_policy(tmp_path: Path) -> None:
    """ROUND_FROM=last: round 2's PPO measured round 1's policy as its `_init`; the rounds table's gain is still
    over the SFT policy (round 1's `_init`), like the oracle's, so the rounds compare on one baseline."""
    def ppo(d: Path, init: float, final: float) -> None:
        write_stage(d, "ppo", {"eval/gold_score_init": init, "eval/gold_score": final, "eval/kl_to_sft": 0.5}, [])

    ppo(tmp_path, 0.70, 0.78)
    ppo(tmp_path / "round-2", 0.78, 0.83)  # started from round 1's policy
    ppo(tmp_path / "oracle", 0.70, 0.81)
    rounds = load_rounds(tmp_path)
    assert [r.name for r in rounds] == ["round 1", "round 2", "oracle (gold reward)"]
    assert [round(r.gain, 4) for r in rounds] == [0.08, 0.13, 0.11]
    assert "+0.1300" in rounds_lines(rounds)[2]
