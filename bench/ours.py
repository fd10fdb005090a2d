"""This project's side of one bench run, in its own process (so its peak RSS is its own): the real stage
entry point (`pipeline.stages.<stage>.run`) on the bench assets, timed from outside.

    .venv/bin/python bench/ours.py ppo --assets runs/bench/assets [--ptx] [--quick]
    .venv/bin/python bench/ours.py sft --assets runs/bench/assets [--quick]

PPO: the stage's own loop runs unchanged; `sample_batch` and `ppo_update` are wrapped (in the stage module's
namespace) only to read the clock and count tokens. Timed: from the start of iteration 2's rollout to the end
of the last iteration (rollout: generate, policy/reference/value/reward forwards; rewards, GAE; the PPO
epochs; logging). Not timed: model loading, iteration 1 (warm-up), the held-out evaluations before and after
(shrunk to one prompt) and the final save. The optimization phase alone (the `ppo_update` calls of the timed
iterations) also gives the roofline's achieved FLOP/s.

SFT: our stage (TRL's SFTTrainer with this project's configuration, callbacks and guard), timed from the
Trainer's `on_train_begin` to `on_train_end`; tokens = every input token of the prepared training rows
(prompt and completion; the loss is on the completion only; packed rows hold the same tokens, no padding).

Prints one `BENCH {json}` line (bench/settings.py: emit).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from settings import PPOBench, SFTBench, emit, ppo_settings, sft_settings  # noqa: E402


def ppo_flops_per_token(n_layer: int, d: int, vocab: int) -> tuple[int, int]:
    """Matmul parameters touched per token by (policy, value model): 12·d² per block (QKV 3d², projection d²,
    MLP 8d²), plus the LM head (vocab·d; tied to the embedding, whose lookup is no matmul) or the scalar head."""
    block = n_layer * 12 * d * d
    return block + vocab * d, block + d


def run_ppo(assets: Path, s: PPOBench) -> dict[str, Any]:
    import torch

    import pipeline.stages.ppo as stage
    from pipeline.config import load_config

    marks: list[dict[str, Any]] = []
    sample_batch, ppo_update = stage.sample_batch, stage.ppo_update
    counter = StepCounter()

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        rollout = sample_batch(*args, **kwargs)
        marks.append({"start": t0, "episodes": int(rollout.mask.shape[0]), "tokens": int(rollout.mask.sum()),
                      "seq": list(rollout.query_responses.shape)})
        return rollout

    def timed_update(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = ppo_update(*args, **kwargs)
        marks[-1].update(update_start=t0, end=time.perf_counter())
        return out

    with tempfile.TemporaryDirectory() as run_dir:
        overrides, _ = ppo_settings(s, run_dir, str(assets / "policy"), str(assets / "rm"))
        cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
        stage.sample_batch, stage.ppo_update = timed_sample, timed_update
        try:
            stage.run(cfg)
        finally:
            stage.sample_batch, stage.ppo_update = sample_batch, ppo_update
    if len(marks) != s.iterations or any("end" not in m for m in marks):
        raise RuntimeError(f"expected {s.iterations} timed iterations, saw {len(marks)}: did pipeline/stages/ppo.py "
                           "rename sample_batch or ppo_update?")
    timed = marks[1:] if len(marks) > 1 else marks
    seconds = timed[-1]["end"] - timed[0]["start"]
    mc_matmul = matmul_flops_per_s(assets, s.minibatch_size * timed[0]["seq"][1])
    opt_seconds = sum(m["end"] - m["update_start"] for m in timed)
    episodes = sum(m["episodes"] for m in timed)
    tokens = sum(m["tokens"] for m in timed)
    # Optimization FLOPs: forward + backward ≈ 6 × matmul params × tokens, for the policy and the value model
    # over the full sequences (prompt + completion) of every minibatch of every PPO epoch, plus the policy on
    # the ptx blocks when γ_ptx > 0. Attention's own score/value products (∝ sequence length²) are left out.
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(assets / "policy")
    n_policy, n_value = ppo_flops_per_token(mc.n_layer, mc.n_embd, mc.vocab_size)
    seq_tokens = sum(m["seq"][0] * m["seq"][1] for m in timed) * s.ppo_epochs
    ptx_tokens = (len(timed) * s.ppo_epochs * s.num_mini_batches * s.ptx_batch_size * 128) if s.ptx_coef > 0 else 0
    opt_flops = 6 * (n_policy + n_value) * seq_tokens + 6 * n_policy * ptx_tokens
    return {
        "stage": "ppo", "side": "ours", "ptx": s.ptx_coef > 0, "seconds": seconds, "episodes": episodes,
        "tokens": tokens, "episodes_per_s": episodes / seconds, "tokens_per_s": tokens / seconds,
        "expected_tokens": episodes * s.max_new_tokens, "opt_seconds": opt_seconds, "opt_flops": opt_flops,
        "opt_flops_per_s": opt_flops / opt_seconds, "matmul_flops_per_s": mc_matmul, "minibatch_seq": [s.minibatch_size, timed[0]["seq"][1]],
        "n_embd": mc.n_embd, "vocab": mc.vocab_size, "torch_threads": torch.get_num_threads(),
        "optimizer_steps": counter.steps, "expected_steps": s.optimizer_steps,
    }


def matmul_flops_per_s(assets: Path, rows: int, seconds: float = 2.0) -> float:
    """The roofline's ceiling, measured here and now: plain float32 `torch.matmul` on the model's own matrix
    sizes with the optimization phase's row count (one minibatch's tokens): [rows, d] @ [d, n] for n in
    3d (QKV), d (projection), 4d (MLP up), the MLP down [rows, 4d] @ [4d, d] and the LM head [rows, d] @
    [d, vocab]; FLOPs = 2·rows·k·n each, over the wall time of repeated rounds of all five. On the device the
    stage trained on: the GPU when there is one (the clock then waits for the GPU after each round)."""
    import torch
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(assets / "policy")
    d, v = mc.n_embd, mc.vocab_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d), (d, v)]
    mats = [(torch.randn(rows, k, device=device), torch.randn(k, n, device=device)) for k, n in shapes]
    per_round = sum(2 * rows * k * n for k, n in shapes)
    for a, b in mats:  # warm-up
        torch.matmul(a, b)
    sync()
    rounds, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for a, b in mats:
            torch.matmul(a, b)
        sync()
        rounds += 1
    return per_round * rounds / (time.perf_counter() - t0)


def run_sft(assets: Path, s: SFTBench) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    import pipeline.stages.sft as stage
    from pipeline.config import load_config

    clock, counter = SFTClock(), StepCounter()
    with tempfile.TemporaryDirectory() as run_dir:
        overrides, _ = sft_settings(s, run_dir, str(assets / "policy"), str(assets / s.data))
        cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
        stage.run(cfg, callbacks=[clock.callback(TrainerCallback)])
    return {"stage": "sft", "side": "ours", **clock.result(), "optimizer_steps": counter.steps,
            "torch_threads": torch.get_num_threads()}


class StepCounter:
    """Counts every optimizer step of the process (torch's global post-step hook): the two sides of a line
    must take the same number (an accelerate step skipped for gradient accumulation is not counted)."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.steps = 0
        self.handle = register_optimizer_step_post_hook(self._count)

    def _count(self, *args: Any) -> None:
        self.steps += 1


class SFTClock:
    """on_train_begin → on_train_end, and the input tokens of the rows the Trainer's dataloader serves (shared
    with bench/peer.py, which imports this file's class by path: keep it free of pipeline imports)."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.tokens = 0
        self.epochs = 0.0

    def callback(self, base: type) -> Any:
        clock = self

        class Clock(base):  # type: ignore[misc, valid-type]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                dataset = kwargs["train_dataloader"].dataset
                clock.tokens = sum(len(ids) for ids in dataset["input_ids"])
                clock.epochs = args.num_train_epochs
                clock.start = time.perf_counter()

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.end = time.perf_counter()

        return Clock()

    def result(self) -> dict[str, Any]:
        seconds = self.end - self.start
        tokens = int(self.tokens * self.epochs)
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def side_main(description: str, run_ppo: Any, run_sft: Any, argv: list[str] | None, ptx: bool) -> int:
    """One side's command line (this project's, or TRL's in bench/peer.py): one stage's measurement, printed
    as the line bench/run.py reads. `ptx`: the side offers --ptx (TRL has no ptx term)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("stage", choices=["ppo", "sft"])
    p.add_argument("--assets", type=Path, required=True)
    if ptx:
        p.add_argument("--ptx", action="store_true", help="PPO with ptx_coef=1 (the tiny profile's γ_ptx)")
    p.add_argument("--iterations", type=int, default=PPOBench.iterations)
    p.add_argument("--sft-data", default=SFTBench.data, help="demonstrations file in the assets directory")
    p.add_argument("--packing", action="store_true", help="SFT with packing (both sides support it)")
    args = p.parse_args(argv)
    quiet()
    os.chdir(ROOT)
    if args.stage == "ppo":
        ptx_coef = 1.0 if getattr(args, "ptx", False) else 0.0
        result = run_ppo(args.assets, PPOBench(iterations=args.iterations, ptx_coef=ptx_coef))
    else:
        result = run_sft(args.assets, SFTBench(data=args.sft_data, packing=args.packing))
    emit(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return side_main("this project's side of one bench run", run_ppo, run_sft, argv, ptx=True)


if __name__ == "__main__":
    sys.exit(main())
