"""`python -m pipeline ppo ...` that stops at iteration STOP_AT_ITERATION (0-based), on every rank at once, as a
Ctrl-C would: run by tests/test_zero.py under `accelerate launch` to interrupt a multi-process PPO run after
a checkpoint was written. Not a test module (pytest collects test_*.py only)."""

from __future__ import annotations

import os
import sys

from pipeline.__main__ import main
from pipeline.stages import ppo

STOP = int(os.environ["STOP_AT_ITERATION"])
_update = ppo.ppo_update


def _interrupted(*args, **kwargs):
    if args[-1] == STOP:  # ppo_update's last argument is the iteration index
        raise KeyboardInterrupt
    return _update(*args, **kwargs)


ppo.ppo_update = _interrupted
sys.exit(main(sys.argv[1:]))
