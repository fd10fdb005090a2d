"""`python -m pipeline <stage> ...` that SIGKILLs itself at a named point, for tests/test_faults.py. Not a test
module (pytest collects test_*.py only).

KILL_AT=<point>:<n> kills the process (SIGKILL: no handler, no cleanup, as the OOM killer or a node failure
would) the n-th time it reaches <point>:

  step        at the end of optimizer step n, before its checkpoint and log (PPO: after iteration n's update,
              before its metrics, evaluation and checkpoint)
  eval        inside an evaluation: the Trainer's n-th prediction batch, the RM's n-th scoring pass, PPO's
              n-th held-out evaluation (between its generation and its scoring)
  checkpoint  inside the n-th checkpoint write: weights, optimizer, scheduler and RNG state written, the state
              file (trainer_state.json / ppo_state.json) not yet
  final       between the final model save and the atomic rename (staging holds the weights, no summary.json)
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# This checkout's pipeline, whatever copy of it is installed (a script's sys.path starts at its own folder).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

point, _, nth = os.environ["KILL_AT"].partition(":")
N = int(nth or 1)
_hits = 0


def _reached(name: str) -> None:
    global _hits
    if name == point:
        _hits += 1
        if _hits == N:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _after(obj: Any, attr: str, name: str) -> None:
    """Reach point `name` right after `obj.attr(...)` returns."""
    original: Callable[..., Any] = getattr(obj, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _reached(name)
        return result

    setattr(obj, attr, wrapped)


def _before(obj: Any, attr: str, name: str) -> None:
    """Reach point `name` when `obj.attr(...)` is called."""
    original: Callable[..., Any] = getattr(obj, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _reached(name)
        return original(*args, **kwargs)

    setattr(obj, attr, wrapped)


from accelerate import Accelerator  # noqa: E402
from transformers import Trainer  # noqa: E402
from transformers.trainer_callback import CallbackHandler  # noqa: E402

from pipeline import checkpoint, rollout  # noqa: E402
from pipeline.__main__ import main  # noqa: E402
from pipeline.stages import ppo, rm  # noqa: E402

# Trainer stages
_after(CallbackHandler, "on_step_end", "step")
_before(CallbackHandler, "on_prediction_step", "eval")
_after(Trainer, "_save_rng_state", "checkpoint")  # the last file before trainer_state.json
_before(rm, "score_rankings", "eval")
# PPO
_after(ppo, "ppo_update", "step")
_after(Accelerator, "save_state", "checkpoint")  # into checkpoint-N.tmp, before ppo_state.json and the rename
_generate = rollout.generate_rollout


def _generate_then_maybe_kill(*args: Any, **kwargs: Any) -> Any:
    result = _generate(*args, **kwargs)
    if kwargs.get("with_values") is False:  # only evaluate_policy samples without values
        _reached("eval")
    return result


rollout.generate_rollout = _generate_then_maybe_kill
# every stage
_before(checkpoint.StageOutput, "commit", "final")

sys.exit(main(sys.argv[1:]))
