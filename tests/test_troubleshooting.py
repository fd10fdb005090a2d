"""docs/troubleshooting.md names only metrics the stages really log and config keys that really exist.

The metric set is not a hand list: it is read from a real small run of all four stages (the `small_pipeline`
fixture): every key of every stage's log_history.jsonl in the tracker's names (`tracking.rewrite_logs`, as
W&B, TensorBoard and the report see them) and of its summary.json metrics. The keys come from
`pipeline.config.describe()`. Tables (W&B `log_table`) are found in the stages' source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import Config, describe
from pipeline.tracking import rewrite_logs
from tests.conftest import ROOT

TRAINING_STAGES = ("pretrain", "sft", "rm", "ppo")

DOC = ROOT / "docs" / "troubleshooting.md"
BACKTICKED = re.compile(r"`([^`\s]+)`")
ENTRIES = {  # the problems the doc must cover (issue 14), as words its headings must contain
    "reward not rising", "kl exploding", "nan", "out of memory", "reward model at chance", "reward hacking",
    "sft forgets", "slow generation",
}


def logged_metrics(cfg: Config) -> set[str]:
    names: set[str] = set()
    for stage in TRAINING_STAGES:  # the label stage logs nothing over steps: its summary is its record
        out = cfg.stage_dir(stage)
        for line in (out / "log_history.jsonl").read_text().splitlines():
            names |= set(rewrite_logs(json.loads(line)))
        names |= set(json.loads((out / "summary.json").read_text())["metrics"])
    return names


def logged_tables() -> set[str]:
    """Names passed to tracking.log_table by the stages (tables of samples, not metrics)."""
    source = "".join(p.read_text() for p in (ROOT / "pipeline").rglob("*.py"))
    return set(re.findall(r'log_table\(\s*"([^"]+)"', source)) | set(re.findall(r'_log_samples_table\(\s*"([^"]+)"', source))


def entries(text: str) -> dict[str, str]:
    """Each `## ` section of the doc, by heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def line_names(body: str, label: str) -> list[str]:
    lines = [line for line in body.splitlines() if line.startswith(f"**{label}:**")]
    assert len(lines) == 1, f"expected one '**{label}:**' line"
    return BACKTICKED.findall(lines[0])


@pytest.fixture(scope="module")
def metrics(small_pipeline: Config) -> set[str]:
    names = logged_metrics(small_pipeline)
    assert {"ppo/kl", "eval/pairwise_acc", "train/loss", "eval/gold_score_init"} <= names  # the set is real
    return names


def test_every_entry_names_logged_metrics_and_existing_config_keys(metrics: set[str]) -> None:
    keys = {key for key, _, _ in describe()}
    sections = entries(DOC.read_text())
    headings = " | ".join(sections).lower()
    assert all(word in headings for word in ENTRIES), f"missing entries: {[w for w in ENTRIES if w not in headings]}"
    for heading, body in sections.items():
        cited_metrics, cited_keys = line_names(body, "Metrics"), line_names(body, "Config")
        assert cited_metrics and cited_keys, heading
        assert not set(cited_metrics) - metrics, f"{heading}: metrics never logged: {set(cited_metrics) - metrics}"
        assert not set(cited_keys) - keys, f"{heading}: no such config keys: {set(cited_keys) - keys}"


def test_every_metric_or_key_the_prose_names_exists(metrics: set[str]) -> None:
    # Not only the Metrics/Config lines: any backticked `prefix/name` with a metric prefix, and any backticked
    # `section.key` of a config section, must exist, so the explanations cannot drift either.
    keys = {key for key, _, _ in describe()}
    sections = {key.split(".")[0] for key in keys if "." in key}
    prefixes = {name.split("/")[0] for name in metrics}
    tables = logged_tables()
    assert "ppo/samples" in tables
    bad = []
    for name in BACKTICKED.findall(DOC.read_text()):
        if "/" in name and "." not in name and name.split("/")[0] in prefixes:
            if name not in metrics | tables:
                bad.append(name)
        elif re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", name) and name.split(".")[0] in sections and name not in keys:
            bad.append(name)
    assert not bad, f"docs/troubleshooting.md names metrics or keys that do not exist: {bad}"


def test_a_misspelt_metric_or_key_would_be_caught(metrics: set[str]) -> None:
    # The checks above are only worth something if they can fail.
    keys = {key for key, _, _ in describe()}
    assert "ppo/kl_divergence" not in metrics and "ppo.learning_rate" not in keys
    body = "**Metrics:** `ppo/kl`, `ppo/kl_divergence`\n**Config:** `ppo.kl_coef`\n"
    assert set(line_names(body, "Metrics")) - metrics == {"ppo/kl_divergence"}


def test_the_readme_points_to_the_troubleshooting_doc() -> None:
    assert "docs/troubleshooting.md" in (ROOT / "README.md").read_text()
    assert Path(DOC).is_file()
