"""Atomic stage outputs and resumable training state.

A stage writes into a work directory beside its output, `runs/<profile>/<stage>.partial/`:

    <stage>.partial/
        config.json        the resolved config the interrupted run was started with
        checkpoints/       Trainer checkpoints (model, optimizer, scheduler, RNG, data position)
        baseline.json      metrics of the starting model, measured once before training
        final/             the finished output, assembled here before the rename

Only when the finished output is complete (weights, tokenizer, summary.json) is `final/` renamed to
`runs/<profile>/<stage>/` (a rename within one filesystem is atomic), and the work directory removed.
So an interrupted stage leaves no `<stage>/` that a later stage or `make` could take as finished, and
running it again resumes from the newest complete checkpoint in `checkpoints/`: one whose state file
(trainer_state.json / ppo_state.json, written last) is there and parses. A checkpoint whose write was cut
(SIGKILL, power loss) is removed by the rerun, never resumed from (tests/test_faults.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "wandb")


class StageOutput:
    """The work directory of one stage run and the atomic hand-over of its result."""

    def __init__(self, final_dir: str | Path, resume_key: dict[str, Any]):
        self.final_dir = Path(final_dir)
        self.work_dir = self.final_dir.with_name(self.final_dir.name + ".partial")
        self.checkpoints_dir = self.work_dir / "checkpoints"
        self.staging_dir = self.work_dir / "final"
        self.resume_key = resume_key
        self.is_main = True

    def prepare(self, is_main: bool = True) -> str | None:
        """Create the work directory; return the checkpoint to resume from, if an interrupted run left one.

        Only the main process (`is_main`) writes here and in `commit`; every process reads.

        Resuming with a different config would silently mix two runs, so a changed config is an error that
        names the changed keys.
        """
        self.is_main = is_main
        key_file = self.work_dir / "config.json"
        if key_file.is_file():
            old = json.loads(key_file.read_text())
            changed = sorted(_diff(old, self.resume_key))
            if changed:
                raise ConfigError(
                    f"{self.work_dir} holds an interrupted run started with a different config "
                    f"(changed: {', '.join(changed[:6])}). Delete that directory to start over, "
                    "or restore those values to resume it."
                )
        elif self.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            write_json(key_file, self.resume_key)
        if self.is_main:
            # A previous run that died after its rename, while deleting its work directory (see `commit`).
            shutil.rmtree(self._trash, ignore_errors=True)
        last = last_complete_checkpoint(self.checkpoints_dir)
        if self.is_main and self.checkpoints_dir.is_dir():
            # Checkpoints whose write was cut (SIGKILL, power loss) are never resumed from; they go, so that
            # the rerun rewrites them from scratch instead of into a directory holding half of a file set.
            for d in self.checkpoints_dir.iterdir():
                if d.is_dir() and d.name.startswith("checkpoint-") and not _complete(d):
                    log.info("removing the incomplete checkpoint %s (its write was interrupted)", d)
                    shutil.rmtree(d, ignore_errors=True)
        if last:
            log.info("resuming from %s", last)
        return last

    @property
    def _trash(self) -> Path:
        return self.final_dir.with_name(self.final_dir.name + ".partial.done")

    def load_baseline(self) -> dict[str, Any] | None:
        path = self.work_dir / "baseline.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_baseline(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            write_json(self.work_dir / "baseline.json", metrics)

    def save_checkpoint(self, accelerator: Any, files: dict[str, Any], step: int, keep: int) -> None:
        """accelerate's full state (models, optimizer, scheduler, RNG) plus our own JSON `files` (name → data,
        e.g. a loop's iteration and history), written to a temporary name and renamed, so an interruption
        mid-save never leaves a checkpoint to resume from; the newest `keep` checkpoints stay (every process)."""
        final = self.checkpoints_dir / f"checkpoint-{step}"
        tmp = self.checkpoints_dir / f"checkpoint-{step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # under DeepSpeed every rank writes its own optimizer shard
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, data in files.items():
                write_json(tmp / name, data)
            tmp.rename(final)
            old = sorted(self.checkpoints_dir.glob("checkpoint-*[0-9]"), key=lambda d: int(d.name.split("-")[-1]))
            for d in old[:-keep]:
                shutil.rmtree(d, ignore_errors=True)
        accelerator.wait_for_everyone()

    def begin_final(self) -> Path:
        """A clean staging directory for the finished output (call on every process before saving)."""
        if self.is_main and self.staging_dir.exists():
            shutil.rmtree(self.staging_dir)  # a previous attempt died half-way through saving
        return self.staging_dir

    def commit(self, summary: dict[str, Any]) -> Path:
        """Write summary.json last, then swap the staging directory in as the stage's output (main only)."""
        if not self.is_main:
            return self.final_dir
        write_json(self.staging_dir / "summary.json", summary)
        old = self.final_dir.with_name(self.final_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if self.final_dir.exists():
            os.replace(self.final_dir, old)  # a re-run replaces the previous output only once it is complete
        os.replace(self.staging_dir, self.final_dir)
        shutil.rmtree(old, ignore_errors=True)
        # Renamed before it is deleted: a kill half-way through the deletion must not leave a `.partial` whose
        # config.json is gone but whose checkpoints remain, which a rerun with another config would resume.
        os.replace(self.work_dir, self._trash)
        shutil.rmtree(self._trash, ignore_errors=True)
        return self.final_dir


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads when a library reports it in its own exception (safetensors' IoError, torch's writer).
_DISK_FULL_WORDS = ("No space left on device", "StorageFull", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is a write that failed for want of space."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(w in str(e) for w in _DISK_FULL_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _complete(checkpoint: Path) -> bool:
    """A checkpoint whose writer finished: the Trainer writes trainer_state.json last (after the weights,
    optimizer, scheduler and RNG state), PPO renames its `checkpoint-N.tmp` only once ppo_state.json is in it.
    The state file must also parse: the Trainer writes it in place, so a kill can leave half of it."""
    if checkpoint.name.endswith(".tmp") or not checkpoint.is_dir():
        return False
    for name in ("trainer_state.json", "ppo_state.json"):
        try:
            json.loads((checkpoint / name).read_text())
            return True
        except (OSError, ValueError):
            continue
    return False


def last_complete_checkpoint(checkpoints_dir: str | Path) -> str | None:
    """The newest complete checkpoint (`checkpoint-<step>`, highest step) in `checkpoints_dir`, or None."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return None
    steps = []
    for d in checkpoints_dir.iterdir():
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and _complete(d):
            steps.append((int(step), d))
    return str(max(steps)[1]) if steps else None


def after_disk_full(final_dir: str | Path, error: BaseException, make_target: str) -> str:
    """Clear what a write that ran out of space left half-written in a stage's work directory, and say what
    is kept: the last complete checkpoint (which a rerun resumes from) and any previous finished output.

    Only the half-written checkpoint and the staging directory go: a rerun must never resume from a checkpoint
    that lacks its optimizer or RNG state, and everything complete stays.
    """
    final_dir = Path(final_dir)
    work_dir = final_dir.with_name(final_dir.name + ".partial")
    checkpoints = work_dir / "checkpoints"
    removed = []
    if checkpoints.is_dir():
        for d in sorted(checkpoints.iterdir()):
            if d.is_dir() and d.name.startswith("checkpoint-") and not _complete(d):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    staging = work_dir / "final"
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        removed.append("final/ (the output being assembled)")
    for tmp in work_dir.glob("*.tmp") if work_dir.is_dir() else ():
        tmp.unlink(missing_ok=True)
    last = last_complete_checkpoint(checkpoints)
    what = str(getattr(error, "strerror", None) or error).splitlines()[0]
    where = f" writing {error.filename}" if isinstance(error, OSError) and error.filename else ""
    parts = [f"disk full ({what}){where}"]
    if removed:
        parts.append(f"removed the half-written {', '.join(removed)} in {work_dir}")
    if last:
        parts.append(f"kept the last complete checkpoint {last}: free some space and run `make {make_target}` "
                     "(or the same command) again to resume from it")
    else:
        parts.append(f"no checkpoint was complete yet: free some space and run `make {make_target}` again")
    if (final_dir / "summary.json").is_file():
        parts.append(f"the previous output {final_dir} is untouched")
    return "; ".join(parts)


def build_summary(
    stage: str, config: dict[str, Any], metrics: dict[str, Any], started: float, **extra: Any
) -> dict[str, Any]:
    """The summary.json every stage writes: metrics, resolved config, seed, wall time, versions."""
    return {
        "stage": stage,
        "metrics": metrics,
        "seed": config.get("seed"),
        "wall_time_s": round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"python": platform.python_version(), **package_versions()},
        **extra,
        "config": config,
    }


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_jsonl(path: Path, rows: Any) -> None:
    """One JSON object per line (log histories, samples) in a stage's staging directory."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
