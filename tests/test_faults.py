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
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, small_overrides
from test_tracking import read_wandb_records, wandb_run

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


# Wall-clock numbers, and what the Trainer logs once at the end of `train()` about that call (the mean loss of
# the steps it took): a resumed run's differ by design.
PER_CALL = {"train_loss", "total_flos"}
TIMING = ("_runtime", "_per_second", "_preparation_time")


def history(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    """log_history.jsonl without timings and per-call rows: every metric logged at every step."""
    rows = [json.loads(line) for line in (run_dir / stage / "log_history.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in PER_CALL and not k.endswith(TIMING)} for r in rows]
    return [r for r in rows if set(r) - {"epoch", "step"}]


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
        assert history(run_dir, stage) == history(tmp_path / "ref", stage), f"{stage} killed at {kill_at}"

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
        m.setenv("WANDB_MODE", "offline")
        code = main(cli)
    assert code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"pretrain: stopped by {signal.Signals(signum).name} after step 3; checkpoint " in err
    assert "resume with `make pretrain PROFILE=tiny ARGS=" in err and "python -m pipeline pretrain" in err
    checkpoint = tmp_path / "stopped" / "pretrain.partial" / "checkpoints" / "checkpoint-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    assert not (tmp_path / "stopped" / "pretrain").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were the stage's only
    # the W&B run is closed as failed with the stop's exit status, and marked preempting on SIGTERM
    run = wandb_run(tmp_path / "stopped", "pretrain")
    records = read_wandb_records(next(run["dir"].glob("run-*.wandb")))
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 128 + signum
    preempting = [r for r in records if r.WhichOneof("record_type") == "preempting"]
    assert len(preempting) == (1 if signum == signal.SIGTERM else 0)
    if signum == signal.SIGINT:
        return
    assert main(cli) == 0  # the rerun resumes from checkpoint-3 and ends as the uninterrupted run does
    assert summary(tmp_path / "stopped", "pretrain")["resumed_from"].endswith("checkpoint-3")
    pretrain.run(load_config("configs/tiny.yaml", [*small_overrides(small_data, tmp_path / "ref"), *extra]))
    assert_same_metrics(summary(tmp_path / "stopped", "pretrain")["metrics"],
                        summary(tmp_path / "ref", "pretrain")["metrics"], "pretrain stopped by SIGTERM at step 3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(stage: str, overrides: list[str], log: Path) -> subprocess.Popen:
    """`accelerate launch` of a stage on 2 CPU processes (DDP over gloo), as the README's LAUNCH does; its
    stderr goes to `log` (a file: a pipe nobody reads while the test waits would fill and block the run)."""
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--config_file", "configs/accelerate/ddp.yaml",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "pipeline", stage, "--config", "configs/tiny.yaml", *overrides]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                                stdout=subprocess.DEVNULL, stderr=f)


def _rank_pid(root: int, rank: int) -> int | None:
    """The pid of the process with RANK=`rank` among `root`'s descendants (Linux /proc)."""
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if pid != root and f"RANK={rank}".encode() in environ:
                return pid
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # exited meanwhile
            continue
    return None


TWO_PROCESS = {
    "pretrain": ["pretrain.max_steps=30", "pretrain.save_steps=10", "pretrain.batch_size=4", "pretrain.data.eval=null"],
    "ppo": ["ppo.iterations=8", "ppo.save_steps=2", "ppo.eval_steps=4", "ppo.rollout_batch_size=4",
            "ppo.minibatch_size=2", "ppo.ptx_batch_size=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "ppo"])
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_the_rerun_matches(
    stage: str, small_data: dict[str, Path], inputs: list[str], tmp_path: Path
) -> None:
    """Pre-emption may reach one rank only: the per-step all-reduce of the stop flag makes both ranks write
    the same checkpoint and stop; the launch exits non-zero, rank 0 prints the resume hint, and the same
    launch again resumes and ends with the uninterrupted 2-process run's metrics."""
    def overrides(run_dir: Path) -> list[str]:
        return [*small_overrides(small_data, run_dir), *TWO_PROCESS[stage], *inputs]

    log = tmp_path / "stderr.txt"
    reference = _launch(stage, overrides(tmp_path / "ref"), log)
    assert reference.wait(timeout=TIMEOUT) == 0, log.read_text()[-4000:]

    run_dir = tmp_path / "stopped"
    proc = _launch(stage, overrides(run_dir), log)
    first = run_dir / f"{stage}.partial" / "checkpoints" / ("checkpoint-10" if stage == "pretrain" else "checkpoint-2")
    deadline = time.time() + TIMEOUT
    while not ((first / "trainer_state.json").is_file() or (first / "ppo_state.json").is_file()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    rank1 = _rank_pid(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) != 0
    (line,) = [x for x in log.read_text().splitlines() if "stopped by SIGTERM" in x]  # one line, from rank 0 only
    step = int(line.split("after step ")[1].split(";")[0])
    assert f"resume with `make {stage} PROFILE=tiny ARGS=" in line
    checkpoint = run_dir / f"{stage}.partial" / "checkpoints" / f"checkpoint-{step}"
    # both ranks saved their RNG state at that step: they stopped together
    rng = sorted(p.name for p in checkpoint.iterdir() if p.name.startswith(("rng_state", "random_states")))
    assert len(rng) == 2, rng
    assert not (run_dir / stage).exists()

    rerun = _launch(stage, overrides(run_dir), log)
    assert rerun.wait(timeout=TIMEOUT) == 0, log.read_text()[-4000:]
    assert summary(run_dir, stage)["resumed_from"].endswith(f"checkpoint-{step}")
    assert_same_metrics(summary(run_dir, stage)["metrics"], summary(tmp_path / "ref", stage)["metrics"],
                        f"2-process {stage} stopped by SIGTERM at step {step}")
