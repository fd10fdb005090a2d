"""The non-finite guard: a NaN or Inf in a loss, gradient, reward, advantage or KL stops the stage before the
update that carries it is applied (or, with `<stage>.nan_policy: skip`, drops that update and counts it).

Why stop rather than carry on: one non-finite gradient step turns every weight it touches into NaN, every
later loss is NaN, and the checkpoints saved after it are poison a rerun would resume from. Stopping before
`optimizer.step()` leaves the last good checkpoint the newest one, so fixing the cause (a lower learning rate,
a clamp, a bad row) and running again resumes from weights that were never touched by the bad update.

Every process takes the same decision: each one's flags are summed over all processes, so N processes stop
(or skip) together instead of one waiting forever in a collective the others have left.

- Trainer stages (pretrain, sft, rm): `NonFiniteGuard`, a mixin for the Trainer subclass, checks the training
  loss before `backward` and the gradients after clipping, just before `optimizer.step()` (a callback's
  `on_pre_optimizer_step`). Under DeepSpeed the engine steps inside `backward`, so only the loss is checked
  there, and `skip` acts as `stop`.
- PPO (our own loop, pipeline/stages/ppo.py): `nonfinite` on the rollout's rewards, advantages and KL, then
  on each minibatch's losses and gradient norm before `optimizer.step()`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A NaN or Inf stopped a stage; the message names the step, the quantity and what to try."""


def nonfinite(values: Mapping[str, torch.Tensor | float | None], accelerator: Any = None) -> list[str]:
    """The names of the `values` that hold a NaN or Inf on any process (collective when N > 1: call on all).

    `None` values (a quantity a process does not have, e.g. no gradient norm under DeepSpeed) count as finite.
    """
    names = list(values)
    device = accelerator.device if accelerator is not None else "cpu"
    flags = torch.tensor(
        [0.0 if v is None or bool(torch.isfinite(torch.as_tensor(v).detach()).all()) else 1.0 for v in values.values()],
        device=device,
    )
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    return [n for n, f in zip(names, flags.tolist(), strict=True) if f > 0]


def stop_message(stage: str, what: str, where: str, checkpoints_dir: str | Path, hint: str) -> str:
    """`<stage>: non-finite <what> at <where>; last good checkpoint checkpoint-N kept; <hint>` (one line)."""
    checkpoints_dir = Path(checkpoints_dir)
    last = get_last_checkpoint(str(checkpoints_dir)) if checkpoints_dir.is_dir() else None
    kept = (f"last good checkpoint {Path(last).name} kept in {checkpoints_dir} (a rerun resumes from it)" if last
            else "no checkpoint was written yet (a rerun starts over)")
    return f"{stage}: non-finite {what} at {where}; the update was not applied; {kept}; {hint}"


def trainer_hint(stage: str, what: str) -> str:
    if what == "loss":
        return (f"try a lower {stage}.lr or {stage}.bf16=false, and check the batch's data "
                f"({stage}.nan_policy=skip drops such batches)")
    # A finite loss with a non-finite gradient overflowed in the backward pass: clipping cannot fix that.
    return (f"try a lower {stage}.lr, or {stage}.bf16=false if it is on ({stage}.nan_policy=skip drops such "
            "steps)")


class _SkipBatch(Exception):
    """Raised inside `compute_loss` to leave out a micro-batch's backward (nan_policy: skip)."""


class NonFiniteGuard:
    """Mixin for a transformers Trainer subclass (put it first): stop or skip on a non-finite loss or gradient.

    Call `configure_guard(stage, policy)` after `__init__`. A subclass whose own `compute_loss` does not call
    `super()` (our RankingTrainer) passes its loss through `check_loss` instead.
    """

    guard_stage: str = "train"
    guard_policy: str = "stop"
    skipped_nonfinite: int = 0  # optimizer steps left out (nan_policy: skip)
    _skip_step: bool = False

    def configure_guard(self, stage: str, policy: str) -> None:
        self.guard_stage, self.guard_policy = stage, policy
        self.skipped_nonfinite = 0
        self.add_callback(_GradientGuard(self))  # type: ignore[attr-defined]

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                   num_items_in_batch=num_items_in_batch)
        self.check_loss(out[0] if return_outputs else out)
        return out

    def check_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, after every process agreed it is finite; evaluation (no grad) is not checked."""
        if torch.is_grad_enabled() and nonfinite({"loss": loss}, self.accelerator):  # type: ignore[attr-defined]
            self._nonfinite("loss")
        return loss

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        try:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        except _SkipBatch:
            # NaN: the Trainer's logging_nan_inf_filter keeps it out of the logged loss average.
            return torch.tensor(float("nan"), device=self.args.device)  # type: ignore[attr-defined]

    def _nonfinite(self, what: str) -> None:
        step = self.state.global_step + 1  # type: ignore[attr-defined]
        if self.guard_policy == "skip" and not self.is_deepspeed_enabled:  # type: ignore[attr-defined]
            self._skip_step = True
            log.warning("%s: non-finite %s at step %d: skipping the step", self.guard_stage, what, step)
            if what == "loss":
                raise _SkipBatch
            return
        raise NonFiniteError(stop_message(self.guard_stage, what, f"step {step}",
                                          self.args.output_dir,  # type: ignore[attr-defined]
                                          trainer_hint(self.guard_stage, what)))


class _GradientGuard(TrainerCallback):
    """Checks the clipped gradients just before `optimizer.step()`: a non-finite gradient norm leaves NaN
    there (clipping scales by max_norm / norm). Skipping sets every gradient to None, which AdamW reads as
    "no update for this parameter": weights, moments and step counts stay as they were."""

    def __init__(self, trainer: NonFiniteGuard):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self.trainer
        model = t.model_wrapped  # type: ignore[attr-defined]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # One number per process: 0 when every gradient is finite, inf otherwise (a norm would overflow itself).
        flag = None
        if grads:
            flag = torch.where(torch.stack([g.isfinite().all() for g in grads]).all(), 0.0, float("inf"))
        if nonfinite({"gradient norm": flag}, t.accelerator):  # type: ignore[attr-defined]
            t._nonfinite("gradient norm")
        if t._skip_step:
            for p in model.parameters():
                p.grad = None
            t.skipped_nonfinite += 1
            t._skip_step = False


# What to try, per quantity PPO checks (pipeline/stages/ppo.py).
PPO_HINTS = {
    "reward": "the reward model scored a completion NaN/Inf: check ppo.reward_model (rebuild it with `make rm`)",
    "KL": "the policy or the reference gave a non-finite log-prob: try a lower ppo.lr or a higher ppo.kl_coef",
    "advantage": "try a lower ppo.lr or ppo.vf_coef, or ppo.whiten_rewards=true",
    "policy loss": "set ppo.log_ratio_clamp (e.g. 20) or try a lower ppo.lr",
    "value loss": "try a lower ppo.lr or ppo.vf_coef",
    "ptx loss": "try a lower ppo.lr or ppo.ptx_coef",
    "gradient norm": "try a lower ppo.lr, or ppo.bf16=false if it is on",
}


class PPOGuard:
    """The guard of PPO's own loop: `check` before each use of a rollout and before each optimizer step."""

    def __init__(self, policy: str, checkpoints_dir: str | Path, accelerator: Any, skipped: int = 0):
        self.policy = policy
        self.checkpoints_dir = Path(checkpoints_dir)
        self.accelerator = accelerator
        self.skipped = skipped  # rollouts and minibatches left out (nan_policy: skip), kept across a resume

    def check(self, values: Mapping[str, torch.Tensor | float | None], iteration: int, what: str) -> bool:
        """True when every value is finite on every process; False when the caller must skip `what` (a
        rollout or a minibatch); raises `NonFiniteError` when the stage must stop."""
        bad = nonfinite(values, self.accelerator)
        if not bad:
            return True
        if self.policy == "skip":
            self.skipped += 1
            log.warning("ppo: non-finite %s at iteration %d: skipping the %s", bad[0], iteration, what)
            return False
        raise NonFiniteError(stop_message("ppo", bad[0], f"iteration {iteration}", self.checkpoints_dir,
                                          PPO_HINTS.get(bad[0], "try a lower ppo.lr")))
