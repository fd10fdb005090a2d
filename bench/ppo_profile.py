"""Where a PPO run's time goes: py-spy's raw (collapsed-stack) samples of `python -m pipeline ppo` summed into the
phases of an iteration (docs/performance.md).

    OMP_NUM_THREADS=1 .venv/bin/py-spy record --format raw -r 50 -o prof.txt -- \
        .venv/bin/python -m pipeline ppo --config configs/tiny.yaml ppo.iterations=10 ...
    .venv/bin/python bench/ppo_profile.py prof.txt --rate 50 --iterations 10

A sample lands in the first phase whose rule matches its stack (rules name functions, not line numbers, so they
survive edits; the ptx term is told apart by the source line it was sampled on, read from this checkout, so run
this on the code that was profiled). Seconds are samples / rate: time the process was seen running Python or
native code, not time it waited for a shared CPU.
"""

from __future__ import annotations

import argparse
import linecache
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")

# (phase, predicate over the parsed stack), first match wins; `in_loop` marks the phases of an iteration.
LOOP_PHASES = [
    "generation (sampling with the KV cache)",
    "scoring: policy + reference log-probs",
    "scoring: value + reward model",
    "rollout: padding, decode, gold",
    "rewards, KL, GAE, whitening, metrics",
    "update: forward (policy + value)",
    "update: forward (ptx batch) + LM loss",
    "update: backward",
    "update: optimizer step + grad clip",
    "update: losses, stats, Python",
    "evaluation (every eval_steps)",
    "logging (W&B, tables, progress bar)",
    "checkpoint",
]
OTHER_PHASES = ["setup, baseline/final evaluation, save", "startup (imports, config)"]


def _frames(stack: str) -> list[tuple[str, str, int]]:
    out = []
    for f in stack.split(";"):
        m = FRAME.match(f)
        out.append((m["func"], m["file"], int(m["line"])) if m else (f, "", 0))
    return out


def _source(file: str, line: int) -> str:
    for base in (ROOT, ROOT / ".venv"):
        path = base / file
        if path.is_file():
            return linecache.getline(str(path), line)
    return ""


def classify(stack: str) -> str:
    frames = _frames(stack)
    funcs = [f for f, _, _ in frames]
    names = " ".join(funcs)

    def has(*parts: str) -> bool:
        return any(p in names for p in parts)

    in_run = any(f == "run" and file.endswith("stages/ppo.py") for f, file, _ in frames)
    if not in_run:
        return OTHER_PHASES[1]
    in_loop = has("ppo_update", "sample_batch", "per_token_rewards", "gae_advantages", "masked_whiten",
                  "_rollout_metrics", "_global_moments", "log_metrics", "_log_samples_table", "_save_checkpoint",
                  "tqdm", "score_rollout", "make_experience")
    if has("evaluate_policy", "corpus_loss"):
        return LOOP_PHASES[10] if _loop_eval(frames) else OTHER_PHASES[0]
    if not in_loop:
        return OTHER_PHASES[0]
    if has("_save_checkpoint"):
        return LOOP_PHASES[12]
    if has("log_metrics", "_log_samples_table", "tqdm"):
        return LOOP_PHASES[11]
    if has("ppo_update"):
        if any(f.endswith(("forward", "policy_forward")) and "ptx" in _source(file, line)
               for f, file, line in frames) or has("lm_loss"):
            return LOOP_PHASES[6]
        if has("backward", "run_backward"):
            return LOOP_PHASES[7]
        if has("Optimizer.step", "adamw", "Adam", "clip_grad_norm", "zero_grad", "Scheduler", "LambdaLR"):
            return LOOP_PHASES[8]
        if has("PolicyAndValue.forward", "SharedBase.forward"):
            return LOOP_PHASES[5]
        return LOOP_PHASES[9]
    if has("GenerationMixin."):
        return LOOP_PHASES[0]
    if has("token_scores"):
        return LOOP_PHASES[2]
    if has("LMHeadModel.forward", "logprobs_from_logits", "response_logprobs", "token_logprobs", "AdapterView"):
        return LOOP_PHASES[1]
    if has("sample_batch", "generate_rollout", "score_rollout", "make_experience"):
        return LOOP_PHASES[3]
    return LOOP_PHASES[4]


def _loop_eval(frames: list[tuple[str, str, int]]) -> bool:
    """An evaluation called from inside the training loop (not the baseline or final one)."""
    return any(f.split(".")[-1] == "evaluate" for f, _, _ in frames) and any(
        f == "run" and "step" in _source(file, line) for f, file, line in frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", help="py-spy record --format raw output")
    parser.add_argument("--rate", type=float, default=50, help="py-spy's -r (samples per second)")
    parser.add_argument("--iterations", type=int, required=True, help="ppo.iterations of the profiled run")
    args = parser.parse_args()
    counts: Counter[str] = Counter()
    for line in Path(args.raw).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[classify(stack)] += int(n)
    loop_total = sum(counts[p] for p in LOOP_PHASES)
    print("| phase | s / iteration | % of an iteration |\n|---|---:|---:|")
    for phase in LOOP_PHASES:
        if counts[phase]:
            s = counts[phase] / args.rate / args.iterations
            print(f"| {phase} | {s:.3f} | {100 * counts[phase] / loop_total:.1f} |")
    print(f"| **iteration total** | **{loop_total / args.rate / args.iterations:.3f}** | 100 |")
    for phase in OTHER_PHASES:
        print(f"| {phase} (once, s) | {counts[phase] / args.rate:.1f} | |")


if __name__ == "__main__":
    main()
