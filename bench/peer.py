"""The peer's side of one bench run: plain TRL 1.12, run by the peer's own venv (bench/.peer-venv, created by
bench/run.py), never by the project's. It imports no pipeline module, only bench/settings.py (standard
library) and the SFT clock of bench/ours.py, so both sides are configured and timed by the same code.

    bench/.peer-venv/bin/python bench/peer.py ppo --assets runs/bench/assets
    bench/.peer-venv/bin/python bench/peer.py sft --assets runs/bench/assets

PPO: `trl.experimental.ppo.PPOTrainer` with the policy and its reference (AutoModelForCausalLM) and the
reward and value models (AutoModelForSequenceClassification) loaded from the same directories our side
loads. Timed: from the start of iteration 2's `batch_generation` to the `on_step_end` of the last iteration,
the same phases as ours (rollout, rewards, advantages, PPO epochs, logging); not timed: loading, iteration 1.
Its two `gc.collect()` calls per iteration are timed too (`gc_seconds`: their share of TRL's time, printed by
bench/run.py among the checks); they stay in TRL's time, since they are part of how TRL 1.12 runs.
SFT: `trl.SFTTrainer`, completion-only loss, packed (`--packing`) or not, timed as ours (bench/ours.py: SFTClock).

Prints one `BENCH {json}` line.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

from ours import SFTClock, StepCounter, side_main  # noqa: E402
from settings import PPOBench, SFTBench, ppo_settings, sft_settings  # noqa: E402


def run_ppo(assets: Path, s: PPOBench) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    tokenizer = AutoTokenizer.from_pretrained(assets / "policy", padding_side="left")
    rows = [json.loads(line) for line in (assets / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    marks: list[dict[str, Any]] = []
    batch_generation = module.batch_generation
    counter = StepCounter()

    def timed_generation(model: Any, queries: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        query_responses, logits = batch_generation(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1]:]
        # What TRL trains on: the response up to its first EOS (none here) and not past padding.
        marks.append({"start": t0, "episodes": int(responses.shape[0]),
                      "tokens": int((responses != tokenizer.pad_token_id).sum())})
        return query_responses, logits

    # TRL 1.12 calls gc.collect() twice per iteration; each call is timed to say what share of TRL's time it is.
    collect, collections = gc.collect, []

    def timed_collect(*args: Any, **kwargs: Any) -> int:
        t0 = time.perf_counter()
        try:
            return collect(*args, **kwargs)
        finally:
            collections.append((t0, time.perf_counter() - t0))

    class StepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks[-1]["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        _, kwargs = ppo_settings(s, out, str(assets / "policy"), str(assets / "rm"))
        torch.manual_seed(s.seed)
        trainer = PPOTrainer(
            args=PPOConfig(**kwargs), processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(assets / "policy"),
            ref_model=AutoModelForCausalLM.from_pretrained(assets / "policy"),
            reward_model=AutoModelForSequenceClassification.from_pretrained(assets / "rm", num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(assets / "rm", num_labels=1),
            train_dataset=dataset, eval_dataset=dataset.select(range(8)), callbacks=[StepEnd()],
        )
        module.batch_generation, gc.collect = timed_generation, timed_collect
        try:
            trainer.train()
        finally:
            module.batch_generation, gc.collect = batch_generation, collect
    if len(marks) != s.iterations or any("end" not in m for m in marks):
        raise RuntimeError(f"expected {s.iterations} timed TRL iterations, saw {len(marks)}")
    timed = marks[1:] if len(marks) > 1 else marks
    seconds = timed[-1]["end"] - timed[0]["start"]
    episodes = sum(m["episodes"] for m in timed)
    tokens = sum(m["tokens"] for m in timed)
    gc_seconds = sum(d for t, d in collections if timed[0]["start"] <= t <= timed[-1]["end"])
    return {
        "stage": "ppo", "side": "trl", "trl": trl.__version__, "seconds": seconds, "gc_seconds": gc_seconds,
        "episodes": episodes,
        "tokens": tokens, "episodes_per_s": episodes / seconds, "tokens_per_s": tokens / seconds,
        "expected_tokens": episodes * s.max_new_tokens, "torch_threads": torch.get_num_threads(),
        "optimizer_steps": counter.steps, "expected_steps": s.optimizer_steps,
    }


def run_sft(assets: Path, s: SFTBench) -> dict[str, Any]:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock, counter = SFTClock(), StepCounter()
    with tempfile.TemporaryDirectory() as out:
        _, kwargs = sft_settings(s, out, str(assets / "policy"), str(assets / s.data))
        torch.manual_seed(s.seed)
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(assets / "policy"), args=SFTConfig(**kwargs),
            train_dataset=load_dataset("json", data_files=str(assets / s.data), split="train"),
            processing_class=AutoTokenizer.from_pretrained(assets / "policy"),
            callbacks=[clock.callback(TrainerCallback)],
        )
        trainer.train()
    return {"stage": "sft", "side": "trl", "trl": trl.__version__, **clock.result(),
            "optimizer_steps": counter.steps, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    return side_main("TRL's side of one bench run (run it with the peer venv)", run_ppo, run_sft, argv, ptx=False)


if __name__ == "__main__":
    sys.exit(main())
