"""Reward-model training throughput: this project's per-prompt batching against TRL's RewardTrainer.

Both train the same model (identical initial weights) for one epoch on the same K = 4 rankings, with the
same sequence length, learning rate and number of comparisons per optimizer step. This project forwards
each of a prompt's K completions once and takes all of its C(K,2) comparisons from those K rewards; TRL
takes chosen/rejected pairs, so the rankings are expanded to pairs for it and every comparison costs two
forwards (12 instead of 4 for K = 4 without ties). The measure is comparisons trained per second of
`train()` (the Trainer's own `train_runtime`, which excludes data preparation), best of a few
alternating runs.

    .venv/bin/python bench/rm_throughput.py                    # tiny GPT-2, 512 prompts, CPU
    .venv/bin/python bench/rm_throughput.py --init runs/tiny/sft --prompts 1024
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

# This checkout's pipeline package (and bench/settings.py), whatever the venv's editable install points at.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, PrinterCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402
from trl.trainer.utils import disable_dropout_in_model  # noqa: E402

from pipeline.config import DataConfig, ModelConfig, RMConfig, TokenizerConfig  # noqa: E402
from pipeline.data import load_rankings, ranking_pairs  # noqa: E402
from pipeline.modeling import build_tiny_model, build_tiny_tokenizer, ensure_distinct_pad, load_reward_model  # noqa: E402
from pipeline.ranking import RankingCollator, encode_rankings  # noqa: E402
from pipeline.stages.rm import RankingTrainer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/tiny/rankings.train.jsonl", help="ranked K = 4 rows")
    p.add_argument("--prompts", type=int, default=512, help="prompts (rankings) to train on")
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per step for this project")
    p.add_argument("--max-length", type=int, default=64, help="tokens per prompt + completion, both trainers")
    p.add_argument("--init", default=None, help="SFT or RM directory; default: a fresh tiny GPT-2 (4x128)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating; the best is reported")
    p.add_argument("--side", choices=["both", "ours", "trl"], default="both",
                   help="one side only, once, printing a `BENCH {json}` line (what `make bench` runs)")
    return p.parse_args()


def build_model(init: str | None):
    if init:
        return load_reward_model(init)
    tokenizer = build_tiny_tokenizer(TokenizerConfig())
    torch.manual_seed(0)
    # The tiny profile's GPT-2 (the ModelConfig defaults), with a scalar head instead of the LM head.
    config = build_tiny_model(ModelConfig(), tokenizer).config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    ensure_distinct_pad(model, tokenizer)
    return model, tokenizer


def common_args(out: str, batch: int) -> dict:
    return {
        "output_dir": out, "per_device_train_batch_size": batch, "num_train_epochs": 1, "learning_rate": 5e-4,
        "lr_scheduler_type": "constant", "save_strategy": "no", "eval_strategy": "no", "logging_steps": 10_000,
        "report_to": "none", "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
    }


def run_ours(model, tokenizer, rows: datasets.Dataset, args: argparse.Namespace, comparisons: int) -> float:
    examples = encode_rankings(rows, tokenizer, args.max_length, "bench")
    rm_cfg = RMConfig(data=DataConfig(train=args.data), batch_size=args.batch_prompts)  # margin, centering off
    with tempfile.TemporaryDirectory() as out:
        trainer = RankingTrainer(
            model=model, args=TrainingArguments(**common_args(out, args.batch_prompts), remove_unused_columns=False),
            train_dataset=examples, data_collator=RankingCollator(tokenizer.pad_token_id),
            processing_class=tokenizer, rm=rm_cfg, held_out=[], gold=None,
        )
        trainer.remove_callback(PrinterCallback)
        runtime = trainer.train().metrics["train_runtime"]
    return comparisons / runtime


def run_trl(model, tokenizer, rows: datasets.Dataset, args: argparse.Namespace, comparisons: int) -> float:
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completions"][w], "rejected": r["completions"][lo]}
        for r in rows for w, lo in ranking_pairs(r["ranks"])
    ]
    batch = round(args.batch_prompts * comparisons / len(rows))  # the same comparisons per optimizer step
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(**common_args(out, batch), max_length=args.max_length, disable_dropout=True)
        trainer = RewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs),
                                processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        # TRL drops pairs longer than max_length instead of truncating them; count only what it trains on.
        comparisons = len(trainer.train_dataset)
        runtime = trainer.train().metrics["train_runtime"]
    return comparisons / runtime


def main() -> int:
    args = parse()
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    base, tokenizer = build_model(args.init)
    disable_dropout_in_model(base)
    rows = load_rankings(args.data)
    rows = rows.filter(lambda r: len(r["completions"]) == 4).select(range(min(args.prompts, len(rows))))
    comparisons = sum(len(ranking_pairs(r)) for r in rows["ranks"])
    print(f"data: {len(rows)} prompts with K = 4 ({comparisons} comparisons, ties give none), "
          f"max_length {args.max_length}; model: {base.num_parameters() / 1e6:.2f}M parameters")
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    if args.side != "both":
        from settings import emit

        fn = run_ours if args.side == "ours" else run_trl
        emit({"stage": "rm", "side": args.side, "comparisons_per_s": fn(base, tokenizer, rows, args, comparisons),
              "comparisons": comparisons, "torch_threads": torch.get_num_threads()})
        return 0
    results: dict[str, list[float]] = {"this project": [], "TRL RewardTrainer": []}
    for i in range(args.repeats):
        # Alternate the order so neither trainer always runs on a warm (or cold) machine.
        order = [("this project", run_ours), ("TRL RewardTrainer", run_trl)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            results[name].append(fn(copy.deepcopy(base), tokenizer, rows, args, comparisons))
            print(f"  run {i + 1}: {name:<18} {results[name][-1]:8.1f} comparisons/s", flush=True)

    # Best of N, as timeit does: other load on the machine only ever slows a run down.
    ours, trl = (max(results[k]) for k in results)
    print(f"\nthis project:      {ours:8.1f} comparisons/s (best of {args.repeats})")
    print(f"TRL RewardTrainer: {trl:8.1f} comparisons/s (best of {args.repeats})")
    print(f"ratio:             {ours / trl:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
