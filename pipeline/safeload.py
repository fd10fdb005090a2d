"""Resuming never unpickles code: DeepSpeed's checkpoint loader made to read with `torch.load(weights_only=True)`.

Without DeepSpeed every file of our own training state is already read that way: the Trainer's optimizer,
scheduler and RNG files (transformers' `torch.load(..., weights_only=True)`) and PPO's `accelerator.load_state`
(accelerate's `load` defaults to `weights_only=True`). DeepSpeed's default checkpoint engine, which both use
under ZeRO, calls `torch.load(weights_only=False)`: a tampered `*_optim_states.pt` would run any code it names.
Its checkpoints hold tensors and plain containers plus two DeepSpeed classes, allowlisted here by name; they
are rebuilt from their attribute dicts (no constructor or other code runs), so the load stays data-only.
"""

from __future__ import annotations

from typing import Any

import torch


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its ZeRO checkpoints pickle (the stage enum, the fp16/bf16 loss-scaler state)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def weights_only_deepspeed_checkpoints() -> None:
    """Replace DeepSpeed's `TorchCheckpointEngine.load` by a weights-only one (idempotent; call before loading)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if getattr(TorchCheckpointEngine.load, "weights_only", False):
        return
    allowed = deepspeed_safe_globals()

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    load.weights_only = True  # type: ignore[attr-defined]
    TorchCheckpointEngine.load = load
