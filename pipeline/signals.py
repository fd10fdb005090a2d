"""Stopping a stage cleanly on SIGTERM (pre-emption) and SIGINT (Ctrl-C).

While a stage runs from the CLI (`stop_on_signals`), SIGTERM or SIGINT does not kill it: the handler only notes
the signal. At the end of the current optimizer step (PPO: iteration) every process asks whether any process
got one (`agreed_stop`, an all-reduce of one number per step, so all ranks stop at the same step even when
the signal reached only one of them), the stage writes a checkpoint at that step, atomically like every
checkpoint, and raises `Stopped`. The CLI prints one line saying how to resume and exits with 128 + the
signal number: 143 for SIGTERM, 130 for SIGINT (the shell's convention for a process ended by a signal).
The tracking run is closed as failed (W&B: marked preempting first when the signal was SIGTERM).

A second Ctrl-C stops at once (KeyboardInterrupt): what is on disk is then the last complete checkpoint,
which a rerun resumes from, as after SIGKILL. A second SIGTERM changes nothing (a launcher such as
`accelerate launch` forwards the signal it received to its workers, which may thus see it twice).

A signal that arrives after the last training step lets the stage finish its final evaluation and save.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOPPABLE = ("pretrain", "sft", "rm", "ppo")  # the stages that check for a stop request at every step

_received: int | None = None  # the first stop signal this process got, if any


class Stopped(Exception):
    """A stage stopped by a signal after writing a checkpoint at `step` (see the module docstring)."""

    def __init__(self, signum: int, stage: str, step: int, checkpoint: str | None):
        self.signum = signum
        self.stage = stage
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"{stage}: stopped by {signal.Signals(signum).name} after step {step}"
                         + (f"; checkpoint {checkpoint} written" if checkpoint else ""))


def _handle(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received == signal.SIGINT and signum == signal.SIGINT:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    if _received is None:
        _received = signum
        log.warning("%s received: finishing the current step, then writing a checkpoint and stopping "
                    "(Ctrl-C again to stop at once)", signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into a request to stop after the current step, for the duration of the block."""
    global _received
    _received = None
    previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None


def received() -> int | None:
    """The stop signal this process got, if any (no collective: see `agreed_stop` for all processes)."""
    return _received


def agreed_stop(device: torch.device | str | None = None) -> int | None:
    """The stop signal if any process got one, else None. Collective under `torch.distributed`: every rank
    must call it at the same point (the end of every step), which makes all of them stop at the same step."""
    local = _received or 0
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([local], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        local = int(flag.item())
    return local or None


class StopOnSignal(TrainerCallback):
    """For the Trainer stages: after the optimizer step in which a stop signal arrived (on any process),
    save a checkpoint and end training; `on_train_end` then raises `Stopped`, so the stage skips its
    final evaluation and save."""

    def __init__(self, stage: str):
        self.stage = stage
        self.signum: int | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        signum = agreed_stop(args.device)
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.signum:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            raise Stopped(self.signum, self.stage, state.global_step, checkpoint)


def resume_hint(stage: str, profile: str, config: str, overrides: list[str]) -> str:
    """The one line a stopped stage prints: the make target (and the CLI command) that resumes it."""
    import shlex

    cli = shlex.join(["python", "-m", "pipeline", stage, "--config", config, *overrides])
    make = f"make {stage} PROFILE={profile}" + (f" ARGS={shlex.quote(' '.join(overrides))}" if overrides else "")
    return f"resume with `{make}` (or `{cli}`, under the same launcher)"
