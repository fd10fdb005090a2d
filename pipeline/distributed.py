"""Launching on N processes: the one place that builds the Accelerator (and the Trainer's distributed
arguments) for every stage, and prepares the models that are not trained.

What `accelerate launch --config_file configs/accelerate/<preset>.yaml` selects is what runs: plain DDP,
or DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 with CPU offload. Three things the libraries do not do for us:

- **No CUDA, several processes.** accelerate finds no collective backend on a CPU-only machine; with
  `cpu=True` it falls back to gloo but silently turns a DeepSpeed config into DDP. So without CUDA we ask
  for gloo explicitly and keep `cpu=False` when DeepSpeed is requested, which runs ZeRO on the CPU.
- **Never a silently dropped DeepSpeed config.** When the launcher asked for DeepSpeed and the resulting
  Accelerator is something else (`use_cpu: true` in the yaml, say), the stage stops with a clear error.
- **Our config fills DeepSpeed's blanks.** A hand-written loop prepares no dataloader, so DeepSpeed cannot
  infer the micro batch; and under DeepSpeed `clip_grad_norm_` does not clip, the engine does, from the
  config's `gradient_clipping`. Both come from the stage's config; a preset that hard-codes a different
  value is an error, not a silent override.

Collectives: under ZeRO-3 every forward is a collective (each layer's parameters are gathered from all
ranks). `even_split` gives each rank the same number of items, padding the short ranks with a repeat whose
result is dropped, so evaluation over a set not divisible by N never leaves a rank waiting forever.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from pipeline.config import ConfigError

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes in this run, as the launcher (accelerate launch / torchrun) announced them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED for every process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def _cpu_only_multiprocess() -> bool:
    return world_size() > 1 and not torch.cuda.is_available()


def build_accelerator(
    *,
    bf16: bool,
    micro_batch_size: int,
    max_grad_norm: float,
    key: str,
) -> Accelerator:
    """The Accelerator of a hand-written training loop (the PPO stage), for whatever the launcher selected.

    `micro_batch_size` is the number of sequences per process in one forward/backward of the trained model
    (one optimizer step each: no accumulation), `max_grad_norm` the clipping norm, `key` the config section
    they come from (named in errors). Mixed
    precision: bf16 when the stage's config says so, otherwise what the launcher's config says.
    """
    handlers = []
    cpu = False
    if _cpu_only_multiprocess():
        if deepspeed_requested():
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        else:
            cpu = True  # data-parallel CPU training over gloo (torchrun, or a DDP config on a CPU machine)
    # The scheduler counts this process's optimizer steps: by default accelerate would step it once per
    # process on every step (its convention for data-sharded epochs), decaying N times too fast.
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else None, step_scheduler_with_optimizer=False,
                              cpu=cpu, kwargs_handlers=handlers)
    check_backend(accelerator.distributed_type)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        fill_deepspeed_config(accelerator, {
            "train_micro_batch_size_per_gpu": (micro_batch_size, f"{key}.minibatch_size"),
            "gradient_accumulation_steps": (1, f"{key} (one optimizer step per minibatch)"),
            "gradient_clipping": (max_grad_norm, f"{key}.max_grad_norm"),
        })
        ds["train_batch_size"] = micro_batch_size * accelerator.num_processes
        # Optimizer offload swaps our AdamW for DeepSpeed's CPU Adam unless told not to; its Adam keeps
        # AdamW's hyperparameters, so let it (it is what makes offload fast).
        log.info("DeepSpeed ZeRO-%d on %d processes (micro batch %d, clipping %.3g%s)", zero_stage(accelerator),
                 accelerator.num_processes, micro_batch_size, max_grad_norm,
                 ", offload" if _offloads(ds) else "")
    return accelerator


def fill_deepspeed_config(accelerator: Accelerator, values: dict[str, tuple[Any, str]]) -> None:
    """Set DeepSpeed config entries from our config: {name: (value, config key it comes from)}.

    An entry the DeepSpeed config leaves unset or "auto" takes our value; one it hard-codes to something
    else is a ConfigError naming both, never a silent override in either direction.
    """
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    for name, (value, key) in values.items():
        current = ds_config.get(name, "auto")
        if current in ("auto", None) or current == value:
            ds_config[name] = value
            continue
        raise ConfigError(f"the DeepSpeed config sets '{name}: {current}' but '{key}' is {value}: remove "
                          f"'{name}' from the accelerate/DeepSpeed config (it comes from '{key}') or make them equal")


def _offloads(ds_config: dict[str, Any]) -> bool:
    zero = ds_config.get("zero_optimization", {})
    return any(zero.get(k, {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer", "offload_param"))


def check_backend(distributed_type: DistributedType) -> None:
    """Fail when the launcher asked for DeepSpeed and got something else: never train silently without it."""
    if deepspeed_requested() and distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(
            f"the launcher asked for DeepSpeed but the run would be {distributed_type.value}: drop `--cpu` "
            "from `accelerate launch` and 'use_cpu: true' from its config (DeepSpeed runs on a CPU-only "
            "machine over gloo without them), and check that `deepspeed` is installed (`make install`)"
        )


def trainer_distributed_kwargs() -> dict[str, Any]:
    """The distributed part of `TrainingArguments` for the Trainer stages (pretrain, sft, rm).

    Without CUDA and with several processes: gloo, and `use_cpu` only for plain data parallelism (it would
    drop a DeepSpeed config). DeepSpeed's own blanks (micro batch, accumulation, clipping) are filled by
    transformers from the same arguments.
    """
    cpu_multi = _cpu_only_multiprocess()
    return {
        "use_cpu": cpu_multi and not deepspeed_requested(),
        "ddp_backend": "gloo" if cpu_multi else None,
    }


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of a DeepSpeed run; 0 for anything else."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def prepare_frozen(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A model used only for inference (PPO's reference and reward model), placed for this launch.

    Under DeepSpeed it becomes an inference-only engine, sharded like the trained model under ZeRO-3 (each
    rank keeps 1/N of its weights) and replicated under ZeRO-2; otherwise it is moved to the device. Call
    it on every rank: under ZeRO-3 building the engine is a collective. Returns what to call for forwards.
    """
    model.requires_grad_(False)
    model.eval()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device)


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module inside a DeepSpeed engine or DDP wrapper (hooks stay active under ZeRO-3)."""
    return getattr(model, "module", model)


@contextmanager
def without_zero3_init() -> Iterator[None]:
    """Within the block, `from_pretrained` loads a plain, whole model even under ZeRO-3 (e.g. a LoRA stage merging
    its adapter on the main process): transformers would otherwise partition the weights as it loads them, a
    collective the other ranks never join."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


@contextmanager
def gathered_for_generation(model: torch.nn.Module, accelerator: Accelerator, gather: bool = True) -> Iterator[Any]:
    """The unwrapped trained model, its ZeRO-3 shards gathered once for a whole `generate` when `gather`.

    Without gathering every decoding step is a collective over all layers (slow, and every rank must make
    the same number of steps: transformers syncs them when ZeRO-3 is on); with it, each rank generates alone
    on the full weights, which must then fit on one device.
    """
    from trl.models.utils import unwrap_model_for_generation

    with unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=gather) as unwrapped:
        yield unwrapped


def submodule_state_dict(state_dict: dict[str, torch.Tensor], prefix: str, module: torch.nn.Module
                         ) -> dict[str, torch.Tensor]:
    """The entries of a gathered full state dict (`accelerator.get_state_dict`) that belong to `module`, under
    `prefix.`, without the copies of tied weights: gathering clones every tensor (ZeRO), so transformers can no
    longer see that `lm_head.weight` is `wte.weight` and would save it twice."""
    tied = getattr(module, "all_tied_weights_keys", None) or {}
    out = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    return {k: v for k, v in out.items() if not (k in tied and tied[k] in out)}


@contextmanager
def gathered_params(params: list[torch.nn.Parameter | None], modifier_rank: int = 0) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned parameters inside the block; changes made on `modifier_rank` are
    kept (broadcast to every rank on exit). A no-op for parameters that are not partitioned."""
    params = [p for p in params if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def even_split(n: int, accelerator: Accelerator) -> tuple[list[int], int]:
    """This rank's share of `n` items as indices, padded so that every rank gets the same number.

    Returns (indices, real): the first `real` indices are this rank's own; the rest repeat one of them and
    their results must be dropped. Under ZeRO-3 a forward is a collective, so ranks that made fewer
    forwards than the others would hang the run.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    filler = mine[-1] if mine else 0
    return mine + [filler] * (per_rank - len(mine)), len(mine)


def describe(accelerator: Accelerator, **models: torch.nn.Module) -> dict[str, Any]:
    """How this run is laid out, for the stage's summary: backend, processes, ZeRO stage, precision, and the
    share of each named model's parameters that this rank stores (rank 0's view)."""
    return {
        "type": accelerator.distributed_type.value,
        "processes": accelerator.num_processes,
        "zero_stage": zero_stage(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "local_fraction": {name: round(local_fraction(m), 4) for name, m in models.items()},
    }


def local_fraction(model: torch.nn.Module) -> float:
    """Share of the model's parameter elements stored on this rank (1/N under ZeRO-3, 1 otherwise)."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # a ZeRO-3 partitioned parameter: ds_numel is the full size
            held += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            held += p.numel()
            total += p.numel()
    return held / max(total, 1)


def build_deepspeed_ops() -> None:
    """Compile DeepSpeed's CPU ops now (CPU Adam for optimizer offload; shared-memory collectives on the CPU)
    rather than inside the first launched run, where each rank would wait on the compile. `make install`
    calls this; the builds land in torch's extension cache (~/.cache/torch_extensions) and are reused.
    """
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        log.warning("deepspeed is not installed: nothing to build")
        return
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        try:
            builder = get_accelerator().create_op_builder(name)
        except (AttributeError, ValueError):
            continue
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)


if __name__ == "__main__":
    build_deepspeed_ops()
