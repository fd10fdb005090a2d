"""What both sides of `make bench` run, as one settings object per stage mapped to both configurations.

Standard library only: the peer's virtual environment (TRL 1.12, no pipeline package) imports this file
too, so the mapping from one settings object to our override keys and to TRL's config kwargs is a pure
function that tests/test_bench.py checks without either trainer.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

# The peer trainer's pins: only the trainer differs (transformers, accelerate, datasets are pinned to the
# project .venv's versions by bench/run.py when it creates the peer's venv).
PEER_TRL = "trl==1.12.0"
PEER_TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class PPOBench:
    """One PPO run: the tiny profile's shapes (configs/tiny.yaml), a few iterations."""

    iterations: int = 6  # the first is a warm-up, not timed (both sides)
    rollout_batch_size: int = 64
    minibatch_size: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 24
    lr: float = 1e-4
    kl_coef: float = 0.5
    missing_eos_penalty: float = 1.0
    vf_coef: float = 0.1
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    ptx_coef: float = 0.0  # TRL has no ptx term; the second "ours" line sets 1.0
    ptx_batch_size: int = 8
    seed: int = 0

    @property
    def num_mini_batches(self) -> int:
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(f"minibatch_size {self.minibatch_size} must divide rollout_batch_size "
                             f"{self.rollout_batch_size}")
        return self.rollout_batch_size // self.minibatch_size

    @property
    def optimizer_steps(self) -> int:
        return self.iterations * self.ppo_epochs * self.num_mini_batches


def ppo_settings(s: PPOBench, run_dir: str, init: str, reward_model: str) -> tuple[list[str], dict[str, Any]]:
    """(our `python -m pipeline ppo` overrides, TRL 1.12 PPOConfig kwargs) for the same run.

    TRL's batch arithmetic: a rollout of `per_device_train_batch_size * gradient_accumulation_steps` prompts
    is cut into `num_mini_batches` minibatches, each of which is cut into micro-batches of
    `per_device_train_batch_size`, and `accelerator.accumulate` steps the optimizer once per
    `gradient_accumulation_steps` micro-batches. With one micro-batch per minibatch and no accumulation
    (per_device = the whole rollout, gradient_accumulation_steps = 1) TRL steps once per minibatch, as we do:
    ppo_epochs × rollout/minibatch optimizer steps per iteration on both sides.
    """
    ours = [
        f"run_dir={run_dir}", f"ppo.init={init}", f"ppo.reward_model={reward_model}",
        f"seed={s.seed}", "tracking.wandb=false", "tracking.tensorboard=false",
        f"ppo.iterations={s.iterations}", f"ppo.rollout_batch_size={s.rollout_batch_size}",
        f"ppo.minibatch_size={s.minibatch_size}", f"ppo.ppo_epochs={s.ppo_epochs}",
        f"ppo.max_new_tokens={s.max_new_tokens}", f"ppo.lr={s.lr}", "ppo.lr_scheduler=linear",
        "ppo.warmup_ratio=0.0", f"ppo.kl_coef={s.kl_coef}", "ppo.target_kl=null",
        f"ppo.missing_eos_penalty={s.missing_eos_penalty}", f"ppo.vf_coef={s.vf_coef}",
        f"ppo.clip_range={s.clip_range}", f"ppo.clip_range_value={s.clip_range_value}",
        f"ppo.gamma={s.gamma}", f"ppo.lam={s.lam}", f"ppo.temperature={s.temperature}", "ppo.top_k=0",
        "ppo.top_p=1.0", "ppo.whiten_rewards=false", f"ppo.ptx_coef={s.ptx_coef}",
        f"ppo.ptx_batch_size={s.ptx_batch_size}", "ppo.generation_batch_size=null", "ppo.bf16=false",
        "ppo.gradient_checkpointing=false",
        # Outside the timed loop, and TRL has no held-out evaluation: the smallest one our stage allows.
        "ppo.eval_steps=null", "ppo.eval_prompts=1", "ppo.eval_samples_per_prompt=1", "ppo.eval_corpus_blocks=0",
        f"ppo.save_steps={s.iterations + 1}", f"ppo.table_steps={s.iterations + 1}",
    ]
    trl = {
        "output_dir": run_dir, "seed": s.seed, "report_to": "none", "disable_tqdm": True,
        "save_strategy": "no", "logging_steps": 1,
        "total_episodes": s.iterations * s.rollout_batch_size,
        "per_device_train_batch_size": s.rollout_batch_size, "gradient_accumulation_steps": 1,
        "num_mini_batches": s.num_mini_batches, "num_ppo_epochs": s.ppo_epochs,
        "local_rollout_forward_batch_size": s.rollout_batch_size,  # one generate call per rollout, as ours
        "response_length": s.max_new_tokens, "stop_token": "eos", "temperature": s.temperature,
        "learning_rate": s.lr, "lr_scheduler_type": "linear", "warmup_steps": 0, "adam_epsilon": 1e-5,
        "kl_coef": s.kl_coef, "kl_estimator": "k1", "missing_eos_penalty": s.missing_eos_penalty,
        "vf_coef": s.vf_coef, "cliprange": s.clip_range, "cliprange_value": s.clip_range_value,
        "gamma": s.gamma, "lam": s.lam, "whiten_rewards": False,
        "num_sample_generations": 0,  # TRL's periodic sample printing: off (not training)
        "bf16": False, "fp16": False, "gradient_checkpointing": False,  # PPOConfig defaults both on
        "dataloader_num_workers": 0,
    }
    return ours, trl


@dataclass(frozen=True)
class SFTBench:
    """One SFT run: the tiny profile's SFT shapes on the shipped demonstrations."""

    data: str = "demos.jsonl"  # in the assets directory: 1024 rows (demos.quick.jsonl: 128)
    epochs: float = 1.0
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-3
    seed: int = 0
    packing: bool = False  # both sides: TRL's best-fit-decreasing packing (ours: sft.packing)


def sft_settings(s: SFTBench, run_dir: str, init: str, train: str) -> tuple[list[str], dict[str, Any]]:
    """(our `python -m pipeline sft` overrides, TRL SFTConfig kwargs): completion-only loss, the same batch,
    length, schedule and optimizer, packed on both sides (TRL's default best-fit-decreasing strategy; TRL
    batches the packed rows as one flattened row, ours as rows) or on neither."""
    ours = [
        f"run_dir={run_dir}", f"sft.init={init}", f"sft.data.train={train}", "sft.data.eval=null",
        f"seed={s.seed}", "tracking.wandb=false", "tracking.tensorboard=false",
        f"sft.epochs={s.epochs}", f"sft.batch_size={s.batch_size}", f"sft.max_length={s.max_length}",
        f"sft.lr={s.lr}", "sft.lr_scheduler=cosine", "sft.warmup_ratio=0.05", "sft.grad_accum=1",
        "sft.logging_steps=10", "sft.save_steps=100000", "sft.eval_steps=null",
        "sft.generation.num_prompts=0",  # our before/after sampling: outside train(), not timed; off
        f"sft.packing={str(s.packing).lower()}",
    ]
    trl = {
        "output_dir": run_dir, "seed": s.seed, "data_seed": s.seed, "report_to": "none", "disable_tqdm": True,
        "num_train_epochs": s.epochs, "per_device_train_batch_size": s.batch_size, "gradient_accumulation_steps": 1,
        "max_length": s.max_length, "learning_rate": s.lr, "lr_scheduler_type": "cosine", "warmup_steps": 0.05,
        "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no", "packing": s.packing,
        "completion_only_loss": True, "bf16": False, "dataloader_num_workers": 0,
    }
    return ours, trl


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_gpu_mib() -> float | None:
    """The most GPU memory this process's tensors held (PyTorch's allocator), or None when it used no GPU.
    torch is only read if the process already imported it: this file stays importable without it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def gpu_name() -> str | None:
    """The first GPU's name when torch is imported and sees one (the machine line of the table)."""
    torch = sys.modules.get("torch")
    return torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def emit(result: dict[str, Any]) -> None:
    """The one line a bench child prints for bench/run.py (the last line starting with BENCH): its result,
    its peak resident memory and, when it ran on a GPU, its peak GPU memory."""
    result = {**result, "peak_rss_mib": round(peak_rss_mib(), 1)}
    gpu = peak_gpu_mib()
    if gpu is not None:
        result.update(peak_gpu_mib=round(gpu, 1), gpu=gpu_name())
    print("BENCH " + json.dumps(result), flush=True)


def settings_dict(s: Any) -> dict[str, Any]:
    return asdict(s)
