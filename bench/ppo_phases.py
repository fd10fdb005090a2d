"""Where a PPO run's CPU time goes, phase by phase: runs `python -m pipeline ppo` in this process with timers
around the functions of each phase, and prints a markdown table (docs/performance.md).

    OMP_NUM_THREADS=1 .venv/bin/python bench/ppo_phases.py --config configs/tiny.yaml \
        ppo.init=runs/tiny/sft ppo.reward_model=runs/tiny/rm ppo.iterations=10 tracking.wandb=false run_dir=/tmp/x

(any `ppo` stage arguments). Times are CPU seconds of this process (`time.process_time`), so a CPU shared with
other work slows the wall clock but barely these numbers; the wall time is printed too. `--wall` (first argument)
times wall-clock seconds instead (`time.perf_counter`): the split of a run on several torch threads, as the
bench runs it, where CPU seconds add up the threads. Each phase counts its
own time, not that of a timed phase inside it (a stack of timers). The hooks name functions that exist in the
pipeline before and after issue 16's changes and the causal LM class of the tiny profile (GPT-2): run it in
the checkout being measured. Inside the update, the ptx batch's forward is the causal LM call without an
attention mask; its backward is inside "update: backward" (compare a run with ppo.ptx_coef=0).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's pipeline, not an installed one

import accelerate
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.utils import GenerationMixin

from pipeline import checkpoint, modeling, rollout, tracking
from pipeline.__main__ import main
from pipeline.stages import ppo

ORDER = [
    "generation (sampling with the KV cache)",
    "scoring: policy + reference log-probs",
    "scoring: value + reward model",
    "rollout: padding, decode, gold, Python",
    "update: policy forward",
    "update: value forward",
    "update: ptx forward",
    "update: backward",
    "update: optimizer step + grad clip",
    "update: losses, masks, stats, Python",
    "evaluation (in the loop)",
    "logging (W&B, tables)",
    "checkpoint",
    "rewards, GAE, whitening, metrics, Python",
]
ABSORBING = {"generation", "evaluation", "logging", "checkpoint"}  # a timed call inside these counts as theirs

stack: list[list[Any]] = []  # [context, phase, start, time of timed calls inside]
calls: list[tuple[str, float, float, float]] = []  # (phase, start, end, own time) of every timed call
spans: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (start, end) of rollouts and updates


def _phase(context: str, call: str, kwargs: dict[str, Any]) -> str | None:
    """The phase a call belongs to, given the innermost timed context (None: not timed on its own)."""
    if call == "lm":
        if context == "update":
            return ORDER[6] if kwargs.get("attention_mask") is None else ORDER[4]
        return ORDER[1] if context == "rollout" else None
    if call == "scores":
        return {"update": ORDER[5], "rollout": ORDER[2]}.get(context)
    return None


CLOCK = time.process_time  # `--wall`: time.perf_counter


def timed(call: str, fn: Any, context: str | None = None) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outer = stack[-1][0] if stack else "loop"
        if outer in ABSORBING:
            return fn(*args, **kwargs)
        phase = {"generation": ORDER[0], "evaluation": ORDER[10], "logging": ORDER[11], "checkpoint": ORDER[12],
                 "backward": ORDER[7], "optimizer": ORDER[8], "rollout": ORDER[3], "update": ORDER[9]}.get(
                     call) or _phase(outer, call, kwargs)
        if phase is None:
            return fn(*args, **kwargs)
        frame = [context or call, phase, CLOCK(), 0.0]
        stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            elapsed = CLOCK() - frame[2]
            if stack:
                stack[-1][3] += elapsed
            calls.append((phase, frame[2], frame[2] + elapsed, elapsed - frame[3]))
            spans[call].append((frame[2], frame[2] + elapsed))
    return wrapper


def install() -> None:
    ppo.sample_batch = timed("rollout", ppo.sample_batch)
    ppo.ppo_update = timed("update", ppo.ppo_update)
    ppo.evaluate_policy = timed("evaluation", ppo.evaluate_policy)
    GenerationMixin.generate = timed("generation", GenerationMixin.generate)
    GPT2LMHeadModel.forward = timed("lm", GPT2LMHeadModel.forward)
    for module in (modeling, rollout):
        module.token_scores = timed("scores", module.token_scores)
    accelerate.Accelerator.backward = timed("backward", accelerate.Accelerator.backward)
    accelerate.Accelerator.clip_grad_norm_ = timed("optimizer", accelerate.Accelerator.clip_grad_norm_)
    torch.optim.AdamW.step = timed("optimizer", torch.optim.AdamW.step)
    tracking.log_metrics = timed("logging", tracking.log_metrics)
    tracking.log_table = timed("logging", tracking.log_table)
    if hasattr(checkpoint.StageOutput, "save_checkpoint"):
        checkpoint.StageOutput.save_checkpoint = timed("checkpoint", checkpoint.StageOutput.save_checkpoint)
    if hasattr(ppo, "_save_checkpoint"):
        ppo._save_checkpoint = timed("checkpoint", ppo._save_checkpoint)


def report(iterations: int, wall: float) -> None:
    """The timed calls from the first rollout to the end of the last update: the loop (the SFT baseline's and
    the final policy's evaluations, setup and saving are outside it)."""
    first, last = spans["rollout"][0][0], spans["update"][-1][1]
    loop = last - first
    own: dict[str, float] = defaultdict(float)
    for phase, start, end, t in calls:
        if first <= start and end <= last:
            own[phase] += t
    own[ORDER[13]] = loop - sum(own[p] for p in ORDER[:13])
    unit = "CPU s" if CLOCK is time.process_time else "wall s"
    print(f"| phase | {unit} / iteration | % |\n|---|---:|---:|")
    for phase in ORDER:
        if own[phase] > 0.0005 * iterations:
            print(f"| {phase} | {own[phase] / iterations:.3f} | {100 * own[phase] / loop:.1f} |")
    print(f"| **iteration** | **{loop / iterations:.3f}** | 100 |")
    print(f"\n{iterations} iterations: {loop:.1f} {unit} in the loop; the whole command {time.process_time():.1f} "
          f"CPU s, {wall:.1f} s wall")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--wall"]:
        CLOCK, args = time.perf_counter, args[1:]
    iterations = next((int(a.split("=", 1)[1]) for a in args if a.startswith("ppo.iterations=")), None)
    if iterations is None:
        sys.exit("give ppo.iterations=N")
    install()
    started = time.perf_counter()
    code = main(["ppo", *args])
    if code:
        sys.exit(code)
    report(iterations, time.perf_counter() - started)
