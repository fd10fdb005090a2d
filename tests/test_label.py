"""The label stage: the simulated gold labeler (noise, ties), and the stage end to end on a small SFT policy
whose rankings the reward model then trains on."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.config import Config, ConfigError
from pipeline.data import load_rankings
from pipeline.labeling import calibrate_sigma, flips_against_gold, gold_ranks, merge_rankings, tie_groups
from pipeline.tinytask import dense_ranks

# Gold scores as the tiny task gives them: correct/N for N in 2..6, halved for extra words or no EOS.
LEVELS = sorted({c / n * f for n in range(2, 7) for c in range(n + 1) for f in (1.0, 0.5, 0.25)})


def _measure(noise: float, comparisons: int, seed: int = 0) -> tuple[float, dict[float, list[int]]]:
    """Flip rate of the gold labeler over random K = 4 rows, and flips per gold gap."""
    rng = random.Random(seed)
    flipped = total = 0
    by_gap: dict[float, list[int]] = {}
    while total < comparisons:
        scores = [rng.choice(LEVELS) for _ in range(4)]
        ranks = gold_ranks(scores, noise, 1e-6, rng)
        f, c = flips_against_gold(scores, ranks, 1e-6)
        flipped, total = flipped + f, total + c
        for i in range(4):
            for j in range(i + 1, 4):
                gap = round(abs(scores[i] - scores[j]), 6)
                if gap > 1e-6:
                    cell = by_gap.setdefault(gap, [0, 0])
                    cell[0] += (ranks[i] < ranks[j]) != (scores[i] > scores[j])
                    cell[1] += 1
    return flipped / total, by_gap


@pytest.mark.parametrize("noise", [0.1, 0.27, 0.4, 0.5])
def test_flip_rate_on_20k_comparisons_matches_the_noise_setting(noise: float) -> None:
    rate, by_gap = _measure(noise, 20_000)
    # Binomial sd at 20k comparisons is ~0.003; comparisons within a row are correlated, so allow ~4 sd of that x2.
    assert abs(rate - noise) < 0.015, (rate, noise)
    if noise < 0.5:  # a Thurstone labeler: close pairs flip more often than distant ones
        close = [f / n for gap, (f, n) in by_gap.items() if gap <= 0.2 and n > 200]
        far = [f / n for gap, (f, n) in by_gap.items() if gap >= 0.6 and n > 200]
        assert min(close) > max(far)


def test_noise_zero_reproduces_gold_ranks() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        scores = [rng.choice(LEVELS) for _ in range(rng.randint(2, 6))]
        ranks = gold_ranks(scores, 0.0, 1e-6, rng)
        assert ranks == dense_ranks(scores)
        assert flips_against_gold(scores, ranks, 1e-6)[0] == 0


def test_ties_by_threshold() -> None:
    # Scores within the threshold of their sorted neighbour share a group, chained: 0.9~0.86~0.82.
    assert tie_groups([0.9, 0.86, 0.82, 0.5], 0.05) == [0, 0, 0, 1]
    assert tie_groups([0.9, 0.86, 0.82, 0.5], 0.01) == [0, 1, 2, 3]
    assert gold_ranks([0.5, 1.0, 0.5, 0.0], 0.0, 1e-6, random.Random(0)) == [2, 1, 2, 3]
    rng = random.Random(0)
    for _ in range(500):  # with noise, tied completions stay tied and a comparison only crosses groups
        ranks = gold_ranks([0.75, 0.74, 0.2, 0.0], 0.4, 0.05, rng)
        assert ranks[0] == ranks[1] and len(set(ranks)) == 3
    assert flips_against_gold([1.0, 1.0], [1, 2], 1e-6) == (0, 0)  # gold ties carry no comparison


def test_sigma_calibration_is_exact_for_one_pair() -> None:
    sigma = calibrate_sigma([(0.5, 1)], 0.27)
    assert 0.5 * math.erfc(0.5 / (2 * sigma)) == pytest.approx(0.27, abs=1e-9)
    assert calibrate_sigma([(0.5, 1)], 0.0) == 0.0 and math.isinf(calibrate_sigma([(0.5, 1)], 0.5))


def test_merge_keeps_each_labelers_ranking_and_measures_agreement(tmp_path: Path) -> None:
    row = {"prompt": "count up to two\n", "completions": ["one two", "two one", "one"]}
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text(json.dumps({**row, "ranks": [1, 3, 2], "labeler": "ann"}) + "\n")
    b.write_text(json.dumps({**row, "ranks": [1, 2, 3], "labeler": "bob"}) + "\n"
                 + json.dumps({"prompt": "x", "completions": ["p", "q"], "ranks": [2, 1], "labeler": "bob"}) + "\n")
    out = tmp_path / "merged.jsonl"
    stats = merge_rankings([a, b, a], out)  # `a` twice: its repeat is dropped
    assert stats["rows"] == 3 and stats["repeats_dropped"] == 1 and stats["items_ranked_more_than_once"] == 1
    assert stats["shared_comparisons"] == 3 and stats["agreement"] == pytest.approx(2 / 3)
    assert len(load_rankings(str(out))) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**row, "ranks": [1, 1, 1]}) + "\n")
    assert main(["label", "--merge", str(a), str(bad), "-o", str(tmp_path / "x.jsonl")]) == 2


def test_draw_distinct_or_as_often_as_the_source_asks() -> None:
    """label.draw: distinct prompts once each, or the source's rows with their repeats (a prompt PPO trains on
    often is labeled often), both shuffled by the seed and cut at label.num_prompts."""
    from collections import Counter

    from pipeline.stages.label import _draw

    source = [{"prompt": "count to six\n"}] * 30 + [{"prompt": f"name {i} fruits\n"} for i in range(10)]
    distinct = _draw(source, 100, seed=0)
    assert sorted(r["prompt"] for r in distinct) == sorted({r["prompt"] for r in source})
    repeats = _draw(source, 100, seed=0, distinct=False)
    assert Counter(r["prompt"] for r in repeats) == Counter(r["prompt"] for r in source)
    first = _draw(source, 20, seed=0, distinct=False)
    assert len(first) == 20 and first == _draw(source, 20, seed=0, distinct=False)
    assert 10 <= Counter(r["prompt"] for r in first)["count to six\n"] < 20  # ~15 of 20, as often as in the source
    assert [r["prompt"] for r in first] != [r["prompt"] for r in _draw(source, 20, seed=1, distinct=False)]


def test_gold_labeler_needs_a_gold_reward(make_config: Callable[..., Config], sft_dir: Path) -> None:
    from pipeline.stages import label

    with pytest.raises(ConfigError, match=r"label\.labeler' is gold but the profile has no gold reward"):
        label.run(make_config(f"label.policy={sft_dir}", "label.labeler=gold", "gold_reward=null"))


def test_label_stage_end_to_end_then_rm_trains_on_it(
    make_config: Callable[..., Config], sft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pipeline.stages import label, rm

    run = tmp_path / "runs"
    args = [f"label.policy={sft_dir}", "label.labeler=gold", "label.noise=0.27", "label.num_prompts=48",
            "label.k=4", "label.max_new_tokens=8", "label.batch_size=16"]
    metrics = label.run(make_config(*args, run_dir=run))
    out = run / "label"
    assert json.loads((out / "summary.json").read_text())["metrics"] == metrics
    items = [json.loads(line) for line in (out / "to_label.jsonl").read_text().splitlines()]
    assert metrics["prompts"] == 48 and metrics["items"] == len(items) > 0
    assert metrics["items"] + metrics["prompts_dropped_too_few_distinct"] == 48
    for item in items:
        assert len(set(item["completions"])) == len(item["completions"]) >= 2
        assert all(c.strip() for c in item["completions"])
        assert len(item["ended"]) == len(item["gold"]) == len(item["completions"])
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert metrics["rankings"] == len(rankings) and metrics["rankings"] + metrics["dropped_all_tied"] == len(items)
    by_id = {i["id"]: i for i in items}
    flipped = comparisons = 0
    for row in rankings:  # the summary's flip rate is what the rows show against the items' gold scores
        f, c = flips_against_gold(by_id[row["id"]]["gold"], row["ranks"], 1e-6)
        flipped, comparisons = flipped + f, comparisons + c
    assert comparisons == metrics["comparisons"] and flipped / comparisons == pytest.approx(metrics["flip_rate"])
    assert len(load_rankings(str(out / "rankings.jsonl"))) == len(rankings)  # the RM's loader takes it as is

    # The same seed gives the same file; noise 0 ranks every item exactly by gold.
    exact = label.run(make_config(*args, "label.noise=0", run_dir=tmp_path / "exact"))
    assert exact["flip_rate"] == 0.0
    exact_items = (tmp_path / "exact" / "label" / "to_label.jsonl").read_text()
    assert exact_items == (out / "to_label.jsonl").read_text()

    # make rm ARGS="rm.data.train=runs/.../label/rankings.jsonl" trains on it unchanged.
    rm_metrics = rm.run(make_config(f"rm.init={sft_dir}", f"rm.data.train={out / 'rankings.jsonl'}",
                                    "rm.max_steps=3", "rm.batch_size=4", run_dir=run))
    assert (run / "rm" / "summary.json").is_file() and math.isfinite(rm_metrics["train/loss"])

    # label.reward_model: the reward model that judged the policy, checked on the policy's held-out samples by
    # the rm stage's own measure (here that RM judging the SFT samples it already reported on).
    judged = label.run(make_config(*args, f"label.reward_model={run / 'rm'}", run_dir=tmp_path / "judged"))
    assert judged["rm_gold_agreement"] == pytest.approx(rm_metrics["eval/gold_agreement_sft_samples"])
    assert judged["rm_gold_agreement_pooled"] == pytest.approx(rm_metrics["eval/gold_agreement_sft_samples_pooled"])

    # Rebuilding a human-labeled stage never drops people's rankings.
    human = make_config(*args, "label.labeler=human", run_dir=tmp_path / "human")
    label.run(human)
    assert not (tmp_path / "human" / "label" / "rankings.jsonl").exists()
    (tmp_path / "human" / "label" / "rankings.jsonl").write_text(json.dumps(rankings[0]) + "\n")
    with pytest.raises(ConfigError, match="holds 1 rankings made by people"):
        label.run(human)
