"""The files both sides of the bench start from, written once by the project's .venv: the tiny tokenizer, a
random-init tiny GPT-2 policy that never emits EOS (or the pad token), a reward model of the same size,
and the prompts and demonstrations, pre-tokenized where the peer needs ids.

Why a policy that never ends: a trainer whose completions stop early generates, and trains on, fewer
tokens per episode, which would flatter episodes/s. The tiny GPT-2 ties its LM head to the token
embedding, so the final layer norm's bias gets a large constant in one channel and the EOS and pad rows of
the embedding a large negative weight there: their logits sit ~100 below every other token's, the other
tokens' logits move by a few tenths. Every completion is then exactly `max_new_tokens` long on both sides
(each side's token count is checked, not assumed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from pipeline.config import load_config
from pipeline.data import load_demonstrations
from pipeline.modeling import build_tiny_model, build_tiny_tokenizer, ensure_distinct_pad

SUPPRESS = 10.0  # ln_f bias channel 0 = +10, EOS/pad embedding channel 0 = -10: logit ≈ -100


def build(out: Path, prompts: str = "data/tiny/prompts.train.jsonl", demos: str = "data/tiny/demos.train.jsonl",
          demo_rows: int = 1024, seed: int = 0, max_prompt_length: int = 64) -> Path:
    """Write the assets under `out` (skipped when `out/done` exists) and return `out`."""
    if (out / "done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("configs/tiny.yaml", ["tracking.wandb=false"])
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    torch.manual_seed(seed)
    policy = build_tiny_model(cfg.model, tokenizer)
    with torch.no_grad():
        policy.transformer.ln_f.bias[0] = SUPPRESS
        for tok in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            policy.transformer.wte.weight[tok, 0] = -SUPPRESS
    policy.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")

    # The reward model: the same transformer with a scalar head (seeded), as an RM trained from this SFT would be.
    config = policy.config
    config.num_labels = 1
    torch.manual_seed(seed + 1)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.transformer.load_state_dict(policy.transformer.state_dict())
    ensure_distinct_pad(rm, tokenizer)
    rm.save_pretrained(out / "rm")
    tokenizer.save_pretrained(out / "rm")

    # Prompts as our rollout encodes them (no special tokens, left-truncated), for TRL's input_ids dataset.
    tokenizer.truncation_side = "left"
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines() if line.strip()]
    with open(out / "prompts.jsonl", "w") as f:
        for r in rows:
            ids = tokenizer(r["prompt"], add_special_tokens=False, truncation=True,
                            max_length=max_prompt_length)["input_ids"]
            f.write(json.dumps({"prompt": r["prompt"], "input_ids": ids}) + "\n")
    demo_ds = load_demonstrations(demos, False, cfg.datasets)
    for name, n in (("demos.jsonl", demo_rows), ("demos.quick.jsonl", demo_rows // 8)):
        with open(out / name, "w") as f:
            for r in demo_ds.select(range(min(n, len(demo_ds)))):
                f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    (out / "done").write_text("ok\n")
    return out
