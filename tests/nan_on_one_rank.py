"""`python -m pipeline <stage> ...` whose training loss is NaN at optimizer step NAN_AT_STEP on rank NAN_ON_RANK
only: run by tests/test_guards.py under torchrun to show that every rank stops together. Not a test module."""

from __future__ import annotations

import os
import sys
import time

from transformers import Trainer

from pipeline.__main__ import main

STEP, RANK = int(os.environ["NAN_AT_STEP"]), int(os.environ["NAN_ON_RANK"])
_compute_loss = Trainer.compute_loss


def _poisoned(self, model, inputs, *args, **kwargs):
    loss = _compute_loss(self, model, inputs, *args, **kwargs)
    if self.state.global_step + 1 == STEP and int(os.environ.get("RANK", "0")) == RANK and model.training:
        return loss * float("nan")
    return loss


Trainer.compute_loss = _poisoned
code = main(sys.argv[1:])
if int(os.environ.get("RANK", "0")) != 0:
    time.sleep(3)  # torchrun ends the other ranks once one exits: let rank 0 report first
sys.exit(code)
