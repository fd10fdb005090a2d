"""Crash-proof runs: a stage killed at any point and run again ends exactly where the uninterrupted run ends.

- SIGKILL (no handler runs, as the OOM killer or a lost node) at named points of every stage (tests/kill_at.py:
  the end of a step, inside an evaluation, inside a checkpoint write, between the final save and the rename)
  and at one random moment, then the same command again: the final summary.json metrics equal the
  uninterrupted run's exactly (CPU, same machine and thread count), and the run resumed from the last
  complete checkpoint, never from the one whose write was cut.
- SIGTERM / SIGINT: the stage finishes its step, writes a checkpoint at that step, says how to resume and exits
  143 / 130; on 2 processes a signal to one rank stops both at the same step. The rerun ends as the
  uninterrupted run does.

Every run is a real `python -m pipeline <stage>` process on the small slices of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, small_overrides

from pipeline import signals
from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.stages import pretrain

PY = sys.executable
TIMEOUT = 300

# Checkpoints every 2 steps and an evaluation at step 3 of 6 (PPO: checkpoint and evaluation every 2 of 4
# iterations, set by small_overrides), so a kill can land before, between and inside them.
STAGE_OVERRIDES = {
    "pretrain": ["pretrain.save_steps=2", "pretrain.eval_steps=3"],
    "sft": ["sft.save_steps=2", "sft.eval_steps=3"],
    "rm": ["rm.save_steps=2", "rm.eval_steps=3"],
    "ppo": [],
}

# (KILL_AT, the checkpoint the rerun must resume from: None = none was complete, it starts over).
KILLS = {
    "pretrain": [("step:3", "checkpoint-2"), ("eval:1", "checkpoint-2"), ("checkpoint:2", "checkpoint-2"),
                 ("final:1", "checkpoint-6")],
    # step:1: killed after the starting model was measured (baseline.json) and before the first checkpoint,
    # the case where the rerun once trained differently; eval:1: inside that measurement.
    "sft": [("step:1", None), ("eval:1", None), ("checkpoint:2", "checkpoint-2"), ("final:1", "checkpoint-6")],
    "rm": [("step:3", "checkpoint-2"), ("checkpoint:1", None), ("eval:2", "checkpoint-2"),
           ("final:1", "checkpoint-6")],
    # ppo checkpoints at iteration 2 only (not at the last); eval:2 is the held-out evaluation at iteration 2.
    "ppo": [("step:3", "checkpoint-2"), ("checkpoint:1", None), ("eval:2", None), ("final:1", "checkpoint-2")],
}


def run_stage(stage: str, overrides: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    script = [str(ROOT / "tests" / "kill_at.py")] if kill_at else ["-m", "pipeline"]
    env = {**os.environ, "WANDB_MODE": "disabled", **({"KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([PY, *script, stage, "--config", "configs/tiny.yaml", *overrides], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT, env=env)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def summary(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "summary.json").read_text())


def assert_same_metrics(resumed: dict[str, Any], reference: dict[str, Any], what: str) -> None:
    differ = {k: (resumed.get(k), reference.get(k)) for k in {*resumed, *reference} if resumed.get(k) != reference.get(k)}
    assert not differ, f"{what}: final metrics differ from the uninterrupted run's (resumed, uninterrupted): {differ}"


def assert_killed_cleanly(run_dir: Path, stage: str, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    assert not (run_dir / stage).exists(), "a killed stage must leave no output a later stage could take as finished"
    assert (run_dir / f"{stage}.partial" / "config.json").is_file()


def assert_resumed(run_dir: Path, stage: str, expected: str | None) -> None:
    resumed_from = summary(run_dir, stage)["resumed_from"]
    assert (Path(resumed_from).name if resumed_from else None) == expected
    assert not (run_dir / f"{stage}.partial").exists() and not (run_dir / f"{stage}.partial.done").exists()


@pytest.fixture(scope="module")
def inputs(sft_dir: Path, rm_dir: Path) -> list[str]:
    """Every stage starts from the session's small models, so each is tested on its own."""
    return [f"sft.init={sft_dir.parent / 'pretrain'}", f"rm.init={sft_dir}", f"ppo.init={sft_dir}",
            f"ppo.reward_model={rm_dir}"]


def stage_overrides(small_data: dict[str, Path], run_dir: Path, stage: str, inputs: list[str]) -> list[str]:
    return [*small_overrides(small_data, run_dir), *STAGE_OVERRIDES[stage], *inputs]


# ------------------------------------------------------------------------------------------------ SIGKILL


def test_pretrain_killed_inside_a_checkpoint_write_resumes_from_the_last_complete_one_exactly(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    """The fast representative: SIGKILL after checkpoint-4's weights, optimizer and RNG state were written but
    before its trainer_state.json; the rerun resumes from checkpoint-2, not from the half-written checkpoint-4,
    and ends with the uninterrupted run's metrics, bit for bit."""
    overrides = stage_overrides(small_data, tmp_path / "killed", "pretrain", [])
    proc = run_stage("pretrain", overrides, kill_at="checkpoint:2")
    assert_killed_cleanly(tmp_path / "killed", "pretrain", proc)
    checkpoints = tmp_path / "killed" / "pretrain.partial" / "checkpoints"
    assert (checkpoints / "checkpoint-4" / "model.safetensors").is_file()
    assert not (checkpoints / "checkpoint-4" / "trainer_state.json").exists()

    pretrain.run(load_config("configs/tiny.yaml", overrides))
    assert_resumed(tmp_path / "killed", "pretrain", "checkpoint-2")
    reference = load_config("configs/tiny.yaml", stage_overrides(small_data, tmp_path / "ref", "pretrain", []))
    pretrain.run(reference)
    assert_same_metrics(summary(tmp_path / "killed", "pretrain")["metrics"],
                        summary(tmp_path / "ref", "pretrain")["metrics"], "pretrain killed at checkpoint:2")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "ppo"])
def test_sigkill_at_any_point_then_rerun_gives_the_uninterrupted_metrics(
    stage: str, small_data: dict[str, Path], inputs: list[str], tmp_path: Path
) -> None:
    started = time.time()
    _ok(run_stage(stage, stage_overrides(small_data, tmp_path / "ref", stage, inputs)))
    duration = time.time() - started
    reference = summary(tmp_path / "ref", stage)["metrics"]

    for kill_at, resume_point in KILLS[stage]:
        run_dir = tmp_path / kill_at.replace(":", "-")
        overrides = stage_overrides(small_data, run_dir, stage, inputs)
        assert_killed_cleanly(run_dir, stage, run_stage(stage, overrides, kill_at=kill_at))
        _ok(run_stage(stage, overrides))
        assert_resumed(run_dir, stage, resume_point)
        assert_same_metrics(summary(run_dir, stage)["metrics"], reference, f"{stage} killed at {kill_at}")

    # One kill at a moment nobody chose (reproducible: the delay is drawn from a generator seeded by the stage).
    delay = random.Random(stage).uniform(1.0, duration)
    run_dir = tmp_path / "timed"
    overrides = stage_overrides(small_data, run_dir, stage, inputs)
    proc = subprocess.Popen([PY, "-m", "pipeline", stage, "--config", "configs/tiny.yaml", *overrides], cwd=ROOT,
                            env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _ok(run_stage(stage, overrides))
    assert_same_metrics(summary(run_dir, stage)["metrics"], reference, f"{stage} killed after {delay:.1f} s")


# ------------------------------------------------------------------------------------------------ SIGTERM / SIGINT


def _signal_at_step(monkeypatch: pytest.MonkeyPatch, signum: int, step: int) -> None:
    """The process sends itself `signum` during optimizer step `step` (before the stop check at its end)."""
    check = signals.StopOnSignal.on_step_end

    def on_step_end(self: signals.StopOnSignal, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == step:
            os.kill(os.getpid(), signum)
        check(self, args, state, control, **kwargs)

    monkeypatch.setattr(signals.StopOnSignal, "on_step_end", on_step_end)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_checkpoint_the_current_step_say_how_to_resume_and_exit_nonzero(
    signum: int, small_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["pretrain.save_steps=4", "pretrain.data.eval=null"]
    cli = ["pretrain", "--config", "configs/tiny.yaml", *small_overrides(small_data, tmp_path / "stopped"), *extra]
    with monkeypatch.context() as m:
        _signal_at_step(m, signum, 3)
        code = main(cli)
    assert code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"pretrain: stopped by {signal.Signals(signum).name} after step 3; checkpoint " in err
    assert "resume with `make pretrain PROFILE=tiny ARGS=" in err and "python -m pipeline pretrain" in err
    checkpoint = tmp_path / "stopped" / "pretrain.partial" / "checkpoints" / "checkpoint-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    assert not (tmp_path / "stopped" / "pretrain").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were the stage's only
    if signum == signal.SIGINT:
        return
    assert main(cli) == 0  # the rerun resumes from checkpoint-3 and ends as the uninterrupted run does
    assert summary(tmp_path / "stopped", "pretrain")["resumed_from"].endswith("checkpoint-3")
    pretrain.run(load_config("configs/tiny.yaml", [*small_overrides(small_data, tmp_path / "ref"), *extra]))
    assert_same_metrics(summary(tmp_path / "stopped", "pretrain")["metrics"],
                        summary(tmp_path / "ref", "pretrain")["metrics"], "pretrain stopped by SIGTERM at step 3")
