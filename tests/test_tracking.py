"""Experiment tracking: W&B offline runs hold the config, the metric series and the samples table; a machine with
no W&B login runs a stage to the end without a prompt; TensorBoard gets the same metric names."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback
from wandb.proto import wandb_internal_pb2 as pb

from pipeline import tracking
from pipeline.config import Config, ConfigError, load_config, to_dict
from pipeline.stages import pretrain, rm, sft

ROOT = Path(__file__).resolve().parents[1]


def read_wandb_records(path: Path) -> list[pb.Record]:
    """The records of a `.wandb` transaction log, parsed with wandb's own protobuf schema.

    The file is a 7-byte `:W&B` header followed by LevelDB-log framing: 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block = 32 * 1024
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        fragment = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        chunk = fragment if kind in (1, 2) else chunk + fragment
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
    return records


def wandb_run(run_dir: Path, job_type: str, timeout: float = 30.0) -> dict[str, Any]:
    """The run, config, history rows, summary and artifacts of the offline W&B run of one stage.

    wandb's service process writes the `.wandb` file; on a loaded machine its last records can land a
    moment after `finish()` returns, so the file is polled until the run's exit record is in it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _wandb_run(run_dir, job_type)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wandb_run(run_dir: Path, job_type: str) -> dict[str, Any]:
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        records = read_wandb_records(path)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        finished = any(r.WhichOneof("record_type") == "exit" for r in records)
        if runs and runs[0].job_type == job_type and finished:
            history = [
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"
            ]
            summary: dict[str, Any] = {}
            for r in records:
                if r.WhichOneof("record_type") == "summary":
                    summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
            return {
                "run": runs[0],
                "config": {u.key: json.loads(u.value_json) for u in runs[0].config.update},
                "history": history,
                "summary": summary,
                "artifacts": [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"],
                "dir": path.parent,
            }
    raise AssertionError(f"no offline W&B run with job_type {job_type!r} under {run_dir / 'wandb'}")


def series(history: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {row[tracking.STEP]: row[key] for row in history if key in row}


def test_rewrite_logs_puts_trainer_keys_in_the_pipeline_scheme() -> None:
    row = {"loss": 2.5, "learning_rate": 1e-3, "eval_loss": 3.0, "epoch": 0.5, "step": 7, "ppo/kl": 0.1,
           "train_loss": 2.7, "train_runtime": 9.0}
    assert tracking.rewrite_logs(row) == {
        "train/loss": 2.5, "train/learning_rate": 1e-3, "eval/loss": 3.0, "train/epoch": 0.5,
        "train/global_step": 7, "ppo/kl": 0.1, "train/loss_mean": 2.7, "train/runtime": 9.0,
    }


def test_offline_stages_log_config_metrics_samples_and_model_to_one_group(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("sft.eval_steps=3", "tracking.log_model=true", "tracking.tensorboard=true")
    pretrain.run(cfg)
    sft.run(cfg)
    run_dir = Path(cfg.run_dir)
    group = (run_dir / "pipeline_run_id").read_text().strip()
    assert group.startswith("tiny-")
    runs = {stage: wandb_run(run_dir, stage) for stage in ("pretrain", "sft")}
    for stage, run in runs.items():
        assert run["run"].run_group == group and run["run"].display_name == f"tiny-{stage}"
        assert run["run"].project == "rlhf-pipeline"
    assert not (ROOT / "wandb").exists() or not any((ROOT / "wandb").glob("offline-run-*")), "W&B files in the repo"

    w = runs["sft"]
    # The full resolved config, overrides applied.
    resolved = to_dict(cfg)
    for key in ("sft", "pretrain", "model", "tracking", "seed", "gold_reward"):
        assert w["config"][key] == resolved[key], key
    assert w["config"]["sft"]["max_steps"] == 6

    # Metric series on the stage's step axis, in the same names as log_history.jsonl rewritten.
    logged = [tracking.rewrite_logs(json.loads(line))
              for line in (cfg.stage_dir("sft") / "log_history.jsonl").read_text().splitlines()]
    train_loss = series(w["history"], "train/loss")
    assert train_loss == {r["train/global_step"]: pytest.approx(r["train/loss"]) for r in logged if "train/loss" in r}
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6]
    assert 3 in series(w["history"], "eval/loss") and 6 in series(w["history"], "eval/loss")
    assert set(series(w["history"], "train/learning_rate")) == set(train_loss)
    # The gold score of the starting model (step 0) and of the fine-tuned one (last step).
    assert set(series(w["history"], "eval/gold_score")) == {0, 6}

    # The samples table: the same rows as samples.jsonl.
    samples = [json.loads(line) for line in (cfg.stage_dir("sft") / "samples.jsonl").read_text().splitlines()]
    (table_file,) = (w["dir"] / "files" / "media" / "table" / "eval").glob("samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(sft.SAMPLE_COLUMNS)
    assert [row[:2] for row in table["data"]] == [[s["prompt"], s["completion"]] for s in samples]

    # The final summary is summary.json's metrics.
    metrics = json.loads((cfg.stage_dir("sft") / "summary.json").read_text())["metrics"]
    for key in ("eval/loss", "eval/gold_score", "eval/gold_score_init", "train/global_step"):
        assert w["summary"][key] == pytest.approx(metrics[key]), key

    # tracking.log_model: the final model directory as an artifact.
    (artifact,) = [a for a in w["artifacts"] if a.type == "model"]
    assert artifact.name == "tiny-sft"
    assert {"model.safetensors", "summary.json"} <= {e.path for e in artifact.manifest.contents}

    # TensorBoard: the same names, under the run directory.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "sft"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "eval/gold_score", "train/learning_rate"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_offline_rm_run_joins_the_group_with_its_accuracy_series_and_scores_table(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config("rm.eval_steps=3", "rm.num_table_prompts=4")
    pretrain.run(cfg)  # W&B disabled (conftest) for the stages this test does not read
    sft.run(cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    rm.run(cfg)
    w = wandb_run(Path(cfg.run_dir), "rm")
    assert w["run"].run_group == (Path(cfg.run_dir) / "pipeline_run_id").read_text().strip()
    # The untrained head at step 0, then every rm.eval_steps.
    assert sorted(series(w["history"], "eval/pairwise_acc")) == [0, 3, 6]
    assert sorted(series(w["history"], "train/accuracy")) == [1, 2, 3, 4, 5, 6]
    # One table row per held-out completion of the first rm.num_table_prompts prompts, as scores.jsonl.
    scores = [json.loads(line) for line in (cfg.stage_dir("rm") / "scores.jsonl").read_text().splitlines()]
    (table_file,) = (w["dir"] / "files" / "media" / "table" / "eval").glob("rm_scores_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(rm.SCORE_COLUMNS)
    assert [r[1:4] for r in table["data"]] == [
        [c, k, pytest.approx(v)] for s in scores for c, k, v in zip(s["completions"], s["ranks"], s["rewards"], strict=True)
    ]
    assert w["summary"]["eval/pairwise_acc"] == pytest.approx(
        json.loads((cfg.stage_dir("rm") / "summary.json").read_text())["metrics"]["eval/pairwise_acc"])


def test_tracking_helpers_are_no_ops_without_a_run(make_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_config()  # tests run with WANDB_MODE=disabled (conftest)
    assert tracking.start(cfg, "sft") == []
    assert not tracking.is_active()
    tracking.log_metrics({"eval/loss": 1.0}, step=3)
    tracking.log_table("eval/samples", ["prompt", "completion"], [["a", "b"]])
    tracking.log_summary({"eval/loss": 1.0})
    tracking.finish(final_dir=tmp_path)
    assert not (Path(cfg.run_dir) / "wandb").exists()
    assert tracking.start(cfg, "sft", is_main=False) == []  # other processes never log


def test_wandb_mode_follows_config_and_environment(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode(make_config()) == "offline"
    assert tracking.wandb_mode(make_config("tracking.wandb=false")) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode(make_config()) is None
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(ConfigError, match="WANDB_MODE='ofline' is not one of online, offline, disabled"):
        tracking.wandb_mode(make_config())


def test_wandb_variables_win_over_the_profile_and_defaults(make_config: Callable[..., Config]) -> None:
    cfg = make_config("tracking.project=from-profile", "tracking.entity=team-a")
    default = tracking.wandb_init_kwargs(cfg, "rm", environ={})
    run_id = (Path(cfg.run_dir) / "pipeline_run_id").read_text().strip()
    assert default == {"project": "from-profile", "entity": "team-a", "group": run_id, "job_type": "rm",
                       "name": "tiny-rm", "tags": ["tiny", "rm"], "dir": cfg.run_dir}
    environ = {"WANDB_DIR": "/scratch/me", "WANDB_PROJECT": "sweeps", "WANDB_ENTITY": "team-b",
               "WANDB_RUN_GROUP": "exp-7", "WANDB_NAME": "my-rm", "WANDB_TAGS": "lr-sweep, rm ,baseline"}
    assert tracking.wandb_init_kwargs(cfg, "rm", environ=environ) == {
        "project": "sweeps", "entity": "team-b", "group": "exp-7", "job_type": "rm", "name": "my-rm",
        "tags": ["tiny", "rm", "lr-sweep", "baseline"], "dir": "/scratch/me"}
    # Set but blank (`WANDB_DIR= make ...`) counts as unset.
    blank = tracking.wandb_init_kwargs(cfg, "rm", environ={"WANDB_DIR": " ", "WANDB_PROJECT": ""})
    assert blank["dir"] == cfg.run_dir and blank["project"] == "from-profile"


def test_offline_run_goes_under_wandb_dir_when_it_is_set(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wandb_dir = tmp_path / "scratch" / "wb"  # not there yet: the pipeline creates it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    cfg = make_config()
    assert tracking.start(cfg, "sft")
    tracking.log_metrics({"eval/loss": 1.5}, step=2)
    with caplog.at_level("INFO", logger="pipeline.tracking"):
        tracking.finish()
    run = wandb_run(wandb_dir, "sft")
    assert run["run"].project == "from-env"
    assert series(run["history"], "eval/loss") == {2: 1.5}
    assert not (Path(cfg.run_dir) / "wandb").exists()
    assert f"wandb sync {wandb_dir / 'wandb'}/offline-run-*" in caplog.text


def test_tensorboard_without_the_package_is_one_clear_error(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"'tracking.tensorboard' is true but the tensorboard package is missing"):
        tracking.start(make_config("tracking.tensorboard=true"), "pretrain")


def test_no_wandb_login_runs_offline_without_prompting_and_says_once_how_to_sync(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    """A fresh machine: no WANDB_API_KEY, no netrc, WANDB_MODE unset, nobody at stdin."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env |= {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
    run_dir = tmp_path / "runs"
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={run_dir}"])
    assert cfg.tracking.wandb, "the shipped profile tracks by default"
    overrides = [
        f"run_dir={run_dir}", f"tokenizer.train_data={small_data['corpus_train']}",
        f"pretrain.data.train={small_data['corpus_train']}", f"pretrain.data.eval={small_data['corpus_eval']}",
        "model.tiny.n_layer=1", "model.tiny.n_embd=32", "tokenizer.vocab_size=400", "pretrain.max_steps=3",
        "pretrain.batch_size=4", "pretrain.block_size=32", "pretrain.logging_steps=1",
    ]
    output = ""
    # Two stage processes of one pipeline run (the second reruns pretrain longer, as `make` would after an
    # edit): the sync hint comes once, and its glob covers both runs.
    for steps in (3, 4):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "pretrain", "--config", "configs/tiny.yaml", *overrides,
             f"pretrain.max_steps={steps}"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        )
        output += proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-3000:]
    assert output.count("no W&B login found") == 2
    assert output.count("wandb sync") == 1, output[-3000:]
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in output
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    run = wandb_run(run_dir, "pretrain")
    assert series(run["history"], "train/loss").keys() == {1, 2, 3}
    assert not (home / ".netrc").exists()
    assert (run_dir / "pretrain" / "summary.json").is_file()


class StopAt(TrainerCallback):
    """Ctrl-C at a given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_stage_closes_its_run_as_failed(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("pretrain.data.eval=null")
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg, callbacks=[StopAt(2)])
    assert not tracking.is_active()
    run = wandb_run(Path(cfg.run_dir), "pretrain")
    records = read_wandb_records(next(run["dir"].glob("run-*.wandb")))
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1
    assert series(run["history"], "train/loss").keys() == {1}  # step 2 was cut before its log


def test_offline_ppo_run_logs_its_series_and_sample_tables_at_intervals(small_pipeline: Config) -> None:
    from pipeline.stages import ppo

    run_dir = Path(small_pipeline.run_dir)
    w = wandb_run(run_dir, "ppo")
    assert w["run"].run_group == (run_dir / "pipeline_run_id").read_text().strip()
    assert w["config"]["ppo"]["iterations"] == 4 and w["config"]["ppo"]["kl_coef"] == small_pipeline.ppo.kl_coef
    # Every iteration's PPO metrics, and the held-out evaluation before training and every ppo.eval_steps.
    assert sorted(series(w["history"], "ppo/score")) == [1, 2, 3, 4]
    assert sorted(series(w["history"], "ppo/kl")) == [1, 2, 3, 4]
    assert sorted(series(w["history"], "eval/gold_score")) == [0, 2, 4]
    history = [json.loads(line) for line in (small_pipeline.stage_dir("ppo") / "log_history.jsonl").read_text().splitlines()]
    logged = {r["train/global_step"]: r["ppo/score"] for r in history if "ppo/score" in r}
    assert series(w["history"], "ppo/score") == pytest.approx(logged)
    # Sample completions every ppo.table_steps (2) iterations, and the final held-out samples.
    tables = sorted((w["dir"] / "files" / "media" / "table" / "ppo").glob("samples_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == list(ppo.SAMPLE_COLUMNS) and len(table["data"]) == 8
    (final,) = (w["dir"] / "files" / "media" / "table" / "eval").glob("samples_*.table.json")
    samples = [json.loads(line) for line in (small_pipeline.stage_dir("ppo") / "samples.jsonl").read_text().splitlines()]
    assert [r[1] for r in json.loads(final.read_text())["data"]] == [s["completion"] for s in samples]
    summary = json.loads((small_pipeline.stage_dir("ppo") / "summary.json").read_text())["metrics"]
    assert w["summary"]["eval/gold_score_gain"] == pytest.approx(summary["eval/gold_score_gain"])
