"""Experiment tracking: one Weights & Biases run per stage, grouped per pipeline run; TensorBoard as the alternative.

Every stage logs, on the main process only:
  - the full resolved config, as the run's config;
  - per-step metrics on the stage's own step axis (`train/global_step` for the Trainer stages);
  - tables (`log_table`, e.g. SFT's sampled generations) and the final summary (the metrics of the stage's
    summary.json, logged when the stage finishes), plus the final model as an artifact if
    `tracking.log_model` is on.

The runs of one pipeline share a W&B `group` (the pipeline run id, kept in `<run_dir>/pipeline_run_id` so every
stage of one `make` chain finds it) and each has `job_type` = its stage. W&B files go to `<run_dir>/wandb/`.

The standard W&B environment variables win over the profile and these defaults when set (`wandb_init_kwargs`):
that is how sweeps, cluster job scripts and a user's shell redirect runs without editing a profile.
  WANDB_DIR        files go to $WANDB_DIR/wandb/ instead of <run_dir>/wandb/
  WANDB_PROJECT    instead of tracking.project;   WANDB_ENTITY  instead of tracking.entity
  WANDB_RUN_GROUP  instead of the pipeline run id; WANDB_NAME    instead of `<profile>-<stage>`
  WANDB_TAGS       comma-separated, added to the tags `<profile>`, `<stage>`
  WANDB_MODE       online | offline | disabled (below)
`job_type` stays the stage (WANDB_JOB_TYPE is not used: the report and the W&B filters rely on it). Variables
the pipeline does not set itself (WANDB_API_KEY, WANDB_BASE_URL, WANDB_NOTES, WANDB_RUN_ID, ...) reach wandb
untouched.

Modes: `WANDB_MODE=disabled` (or `tracking.wandb: false`) turns W&B off; `WANDB_MODE=offline` logs locally;
with WANDB_MODE unset it logs online when a login is configured (WANDB_API_KEY or `wandb login`'s netrc
entry) and otherwise offline, saying once how to upload the run later (`wandb sync <dir>`). It never
prompts: a pipeline started from `make` or a batch job has nobody to answer.

Metric names follow one scheme in W&B, TensorBoard, summary.json and the report (`rewrite_logs`):
  train/<name>   training metrics (train/loss, train/learning_rate, train/grad_norm, train/epoch)
  eval/<name>    held-out metrics (eval/loss, eval/gold_score, eval/pairwise_acc, ...)
  ppo/<name>     PPO metrics (ppo/score, ppo/kl, ppo/gold_score, ...)
  train/global_step   the step axis of every series
The Trainer's raw keys (`loss`, `eval_loss`) are rewritten the way transformers' WandbCallback does
(`train/loss`, `eval/loss`); keys that already carry a `/` are kept as they are.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations.integration_utils import rewrite_logs as hf_rewrite_logs

from pipeline.config import Config, ConfigError, to_dict

log = logging.getLogger(__name__)

STEP = "train/global_step"

# End-of-training aggregates the Trainer logs once: summary values, not series. transformers would name
# them train/train_runtime, ...; `train_loss` (the mean over the run) must not collide with `train/loss`.
SUMMARY_KEYS = {
    "train_runtime": "train/runtime",
    "train_samples_per_second": "train/samples_per_second",
    "train_steps_per_second": "train/steps_per_second",
    "train_loss": "train/loss_mean",
    "total_flos": "train/total_flos",
}


def rewrite_logs(logs: dict[str, Any], step_key: str = STEP) -> dict[str, Any]:
    """A Trainer log dict (or a `state.log_history` row) in the pipeline's metric names.

    `loss` -> `train/loss`, `eval_loss` -> `eval/loss` (transformers' own rewrite), a history row's `step`
    -> `train/global_step`, the end-of-training aggregates per SUMMARY_KEYS, and `ppo/kl`-style keys as is.
    """
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if "/" in key:
            out[key] = value
        elif key == "step":
            out[step_key] = value
        elif key in SUMMARY_KEYS:
            out[SUMMARY_KEYS[key]] = value
        else:
            out.update(hf_rewrite_logs({key: value}))
    return out


@dataclass
class _StageRun:
    """What is open while one stage is being tracked (main process only)."""

    cfg: Config
    stage: str
    step_key: str
    wandb_run: Any = None  # wandb.Run
    tb_writer: Any = None  # torch.utils.tensorboard.SummaryWriter


_active: _StageRun | None = None


def start(cfg: Config, stage: str, is_main: bool = True, step_key: str = STEP) -> list[TrainerCallback]:
    """Open the tracking run of `stage` and return the Trainer callbacks that feed it.

    Call once per stage, after the stage's input is validated (so bad input leaves no run behind) and before
    the Trainer is built. On processes other than the main one it opens nothing and returns no callbacks.
    `step_key` is the stage's step axis; stages that are not Trainer-driven pass their own (e.g. `ppo/step`)
    and log with `log_metrics`.
    """
    global _active
    if not is_main:
        return []
    if _active is not None:  # a stage that died without finishing (only in-process, e.g. tests)
        finish(exit_code=1)
    tb_writer = _open_tensorboard(cfg, stage)
    run = _init_wandb(cfg, stage, step_key)
    _active = _StageRun(cfg=cfg, stage=stage, step_key=step_key, wandb_run=run, tb_writer=tb_writer)
    return [MetricsCallback()] if (run is not None or tb_writer is not None) else []


def is_active() -> bool:
    """Whether this process logs anywhere (W&B or TensorBoard)."""
    return _active is not None and (_active.wandb_run is not None or _active.tb_writer is not None)


def log_metrics(metrics: dict[str, Any], step: int) -> None:
    """Log scalar metrics at `step` of the active stage's step axis; a no-op when nothing is tracked."""
    if _active is None:
        return
    scalars = {k: v for k, v in metrics.items() if _is_number(v)}
    if _active.wandb_run is not None and scalars:
        _active.wandb_run.log({**scalars, _active.step_key: step})
    if _active.tb_writer is not None:
        for key, value in scalars.items():
            _active.tb_writer.add_scalar(key, value, step)


def log_table(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Log a table (e.g. prompts and sampled completions) to W&B; a no-op when W&B is not active.

    TensorBoard gets it as a markdown text block under the same name.
    """
    if _active is None:
        return
    if _active.wandb_run is not None:
        import wandb

        _active.wandb_run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
    if _active.tb_writer is not None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", "⏎") for v in r) + " |" for r in rows]
        _active.tb_writer.add_text(name, "\n".join(lines))


def log_summary(values: dict[str, Any]) -> None:
    """Set final values in the run's summary (what the W&B runs table shows); a no-op when W&B is not active."""
    if _active is None or _active.wandb_run is None:
        return
    _active.wandb_run.summary.update({k: v for k, v in values.items() if _is_number(v) or isinstance(v, str)})


def finish(final_dir: Path | None = None, exit_code: int = 0) -> None:
    """Close the active run: summary.json's metrics into the summary, the model artifact if asked, then finish."""
    global _active
    current, _active = _active, None
    if current is None:
        return
    summary_file = final_dir / "summary.json" if final_dir is not None else None
    if current.wandb_run is not None:
        run = current.wandb_run
        try:
            if summary_file is not None and summary_file.is_file():
                metrics = json.loads(summary_file.read_text())["metrics"]
                run.summary.update({k: v for k, v in metrics.items() if _is_number(v)})
                if current.cfg.tracking.log_model and exit_code == 0:
                    _log_model(run, current, final_dir, metrics)
        finally:
            offline = run.settings.mode == "offline"
            sync_dir, wandb_dir = run.settings.sync_dir, Path(run.settings.wandb_dir)
            run.finish(exit_code=exit_code)
        if offline:
            _sync_hint(current.cfg, current.stage, sync_dir, wandb_dir)
    if current.tb_writer is not None:
        current.tb_writer.close()


def _sync_hint(cfg: Config, stage: str, sync_dir: str, wandb_dir: Path) -> None:
    """Say how to upload offline runs once per pipeline run, not once per stage: `make sft rm ppo` is
    three processes, and one `wandb sync` with a glob uploads every stage's run, later ones included."""
    marker = wandb_dir / f".sync-hint-{pipeline_run_id(cfg)}"
    if marker.exists():
        log.info("%s: W&B run saved offline in %s", stage, sync_dir)
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    log.info("%s: W&B runs are saved offline; upload this pipeline's runs (this stage's and the later "
             "ones') with: wandb sync %s/offline-run-*", stage, wandb_dir)


F = TypeVar("F", bound=Callable[..., Any])


def tracked(stage: str) -> Callable[[F], F]:
    """Decorate a stage's `run(cfg, ...)`: its tracking run is finished however the stage ends.

    On success the finished stage directory's summary.json goes into the run summary; an exception (a bad
    input, Ctrl-C, `signals.Stopped`) marks the run failed (with the stop's exit code, 143 / 130, and marked
    preempting on SIGTERM) and propagates.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(cfg: Config, *args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(cfg, *args, **kwargs)
            except BaseException as e:
                try:
                    # Stopped by SIGTERM: W&B shows the run as preempted rather than crashed.
                    if getattr(e, "signum", None) == signal.SIGTERM and _active is not None \
                            and _active.wandb_run is not None:
                        _active.wandb_run.mark_preempting()
                    finish(exit_code=getattr(e, "exit_code", 1))
                except Exception as e:  # the stage's own error is the one the user needs to see
                    log.warning("%s: could not close the tracking run (%s: %s)", stage, type(e).__name__, e)
                raise
            finish(final_dir=cfg.stage_dir(stage))
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


class MetricsCallback(TrainerCallback):
    """Sends every Trainer log (train and eval) to the active run in the pipeline's metric names."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        metrics = rewrite_logs(logs)
        finals = {k: v for k, v in metrics.items() if k in SUMMARY_KEYS.values()}
        log_metrics({k: v for k, v in metrics.items() if k not in finals}, step=state.global_step)
        log_summary(finals)


def pipeline_run_id(cfg: Config) -> str:
    """The id shared by every stage of one pipeline run: `<profile>-<start time>`, kept in the run directory.

    The first stage to start writes it; later stages (other processes of the same `make` chain) read it,
    so they land in the same W&B group. `make clean-stages` removes it with the run directory.
    """
    path = Path(cfg.run_dir) / "pipeline_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = f"{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def wandb_mode(cfg: Config) -> str | None:
    """'online', 'offline', 'no-login' (offline for want of a login) or None (W&B off).

    From `tracking.wandb`, WANDB_MODE (and the legacy WANDB_DISABLED), and whether a login exists.
    """
    if not cfg.tracking.wandb:
        return None
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return None
    if env_mode in ("offline", "dryrun"):
        return "offline"
    if env_mode in ("online", "run"):
        return "online"
    if env_mode:
        raise ConfigError(f"WANDB_MODE={env_mode!r} is not one of online, offline, disabled")
    import wandb

    # Looks for WANDB_API_KEY, the netrc entry `wandb login` writes, and wandb's settings files; with
    # prompt=False and verify=False it neither asks nor touches the network.
    return "online" if wandb.login(prompt=False, verify=False) else "no-login"


def wandb_init_kwargs(cfg: Config, stage: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """project, entity, group, job_type, name, tags and dir of `stage`'s W&B run.

    A standard W&B variable that is set (and not blank) wins over the profile's `tracking.*` key and the
    pipeline's default; see the module docstring. wandb itself would let our explicit arguments win over its
    variables, so the precedence is resolved here.
    """
    environ = os.environ if environ is None else environ

    def var(name: str) -> str | None:
        return (environ.get(name) or "").strip() or None

    extra_tags = [t.strip() for t in (var("WANDB_TAGS") or "").split(",") if t.strip()]
    return {
        "project": var("WANDB_PROJECT") or cfg.tracking.project,
        "entity": var("WANDB_ENTITY") or cfg.tracking.entity,
        "group": var("WANDB_RUN_GROUP") or pipeline_run_id(cfg),
        "job_type": stage,
        "name": var("WANDB_NAME") or f"{cfg.profile}-{stage}",
        "tags": list(dict.fromkeys([cfg.profile, stage, *extra_tags])),
        "dir": var("WANDB_DIR") or str(cfg.run_dir),
    }


def _init_wandb(cfg: Config, stage: str, step_key: str) -> Any:
    mode = wandb_mode(cfg)
    if mode is None:
        return None
    import wandb

    kwargs = wandb_init_kwargs(cfg, stage)
    # wandb falls back to a temporary directory, with only a warning, when `dir` does not exist.
    Path(kwargs["dir"]).expanduser().mkdir(parents=True, exist_ok=True)
    offline = mode != "online"
    try:
        run = wandb.init(
            **kwargs,
            config=to_dict(cfg),
            mode="offline" if offline else "online",
            # Offline, wandb's own footer repeats the sync hint that finish() gives; keep it to one.
            settings=wandb.Settings(quiet=offline),
        )
    except Exception as e:  # W&B down, a bad entity, ...: losing the dashboard must not lose the training run
        log.warning("%s: W&B could not start (%s: %s); training continues without it", stage,
                    type(e).__name__, e)
        return None
    run.define_metric(step_key)
    run.define_metric("*", step_metric=step_key, step_sync=True)
    if mode == "no-login":
        # The upload command itself is given once, when the run finishes (finish()).
        log.warning("%s: no W&B login found (WANDB_API_KEY or `wandb login`), so W&B logs offline to %s",
                    stage, run.settings.sync_dir)
    return run


def _open_tensorboard(cfg: Config, stage: str) -> Any:
    if not cfg.tracking.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "'tracking.tensorboard' is true but the tensorboard package is missing: pip install -e '.[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(Path(cfg.run_dir) / "tensorboard" / stage))


def _log_model(run: Any, current: _StageRun, final_dir: Path, metrics: dict[str, Any]) -> None:
    import wandb

    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{current.cfg.profile}-{current.stage}")
    artifact = wandb.Artifact(name, type="model", metadata={k: v for k, v in metrics.items() if _is_number(v)})
    artifact.add_dir(str(final_dir))
    run.log_artifact(artifact, aliases=["latest", run.group or "ungrouped"])


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
