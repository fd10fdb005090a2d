"""Stage label: rank the policy's own samples, the H in RLHF.

sample → to-label file → rank:
  1. draw `label.num_prompts` prompts (shuffled by the seed) from `label.prompts`, by default PPO's training
     prompts: the distribution the reward model has to judge; distinct ones (`label.draw: distinct`), or the
     source's rows with their repeats (`source`), so each prompt is labeled as often as PPO trains on it;
  2. sample `label.k` completions of each from a finished policy (`label.policy`: sft, ppo or a directory);
     empty completions and duplicates are dropped (they carry no comparison, and people should not read one
     twice), and a prompt left with fewer than 2 is dropped too; all counted in the summary;
  3. write `to_label.jsonl` (pipeline/labeling.py has the format) into runs/<profile>/label/;
  4. rank: `label.labeler: gold` ranks every item by the gold reward, with `label.noise` flips of a Thurstone
     labeler and ties within `label.tie_threshold`, into `rankings.jsonl` (the RM's ranked format; rows that
     are all ties are dropped and counted), and reports the measured flip rate against gold;
     `label.labeler: human` stops at the to-label file: `python -m pipeline label --serve` (make label-serve)
     serves it to people, who write `rankings.jsonl` there (pipeline/labelserver.py).

Prompts are sampled in chunks of `label.batch_size`, each seeded by its place in the list, so the samples do
not depend on how many processes share the work under `accelerate launch`; only the main process writes.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers import set_seed as hf_set_seed

from pipeline import labeling
from pipeline.checkpoint import StageOutput, build_summary, write_jsonl
from pipeline.config import Config, ConfigError, GenerationEvalConfig, LabelConfig, stage_key, to_dict
from pipeline.data import as_chat, load_prompts
from pipeline.evaluation import Sample, check_gold_covers, gold_function, render_prompt, sample_completions
from pipeline.modeling import context_length, load_reward_model, load_stage_model
from pipeline.ranking import samples_agreement, score_rankings

log = logging.getLogger(__name__)
STAGE = "label"


def run(cfg: Config) -> dict[str, Any]:
    started = time.time()
    lab = cfg.label
    seed = cfg.seed if lab.seed is None else lab.seed
    hf_set_seed(seed)
    gold = gold_function(cfg.gold_reward)
    if lab.labeler == "gold" and gold is None:
        raise ConfigError("'label.labeler' is gold but the profile has no gold reward (gold_reward: null); "
                          "use label.labeler=human and rank on the page of `python -m pipeline label --serve`")

    # 1. Prompts first: a malformed row fails before a model is loaded.
    source, key = (lab.prompts, "label.prompts") if lab.prompts else (cfg.ppo.data.train, "ppo.data.train")
    prompts = load_prompts(source, registry=cfg.datasets)
    rows = _draw(list(as_chat(prompts) if cfg.chat_prompts else prompts), lab.num_prompts, seed,
                 lab.draw == "distinct")
    state = PartialState()
    out = StageOutput(cfg.stage_dir(STAGE), stage_key(cfg, STAGE))
    if state.is_main_process:
        _keep_human_rankings(cfg)

    # 2. Sample from the policy.
    policy, make_target = _policy(cfg)
    model, tokenizer = load_stage_model(policy, make_target, trust_remote_code=cfg.model.trust_remote_code)
    model.to(state.device)
    check_gold_covers(gold, rows, tokenizer, key)
    out.prepare(is_main=state.is_main_process)
    rendered = [render_prompt(r, tokenizer) for r in rows]
    samples = _sample(model, tokenizer, [text for text, _ in rendered], lab, seed, state)
    # The judging reward model scores across processes (every rank takes part), before only the main one writes.
    agreement = _judge_agreement(lab.reward_model, Path(policy), state) if lab.reward_model and gold else None
    if not state.is_main_process:
        return {}

    # 3. The to-label file.
    items, counts = _items(rendered, samples, gold, lab.k)
    if not items:
        raise ConfigError(f"no prompt of {policy} got 2 distinct non-empty completions out of label.k={lab.k}: "
                          "nothing to rank (raise label.k or label.temperature, or train the policy longer)")
    final = out.begin_final()
    final.mkdir(parents=True)
    write_jsonl(final / "to_label.jsonl", items)
    metrics: dict[str, Any] = {**counts, "items": len(items),
                               "completions_per_item": sum(len(i["completions"]) for i in items) / len(items)}

    # 4. Rank (the gold labeler), or leave it to people.
    if lab.labeler == "gold":
        rankings, ranked = _gold_label(items, lab, seed)
        write_jsonl(final / "rankings.jsonl", rankings)
        metrics.update(ranked)
    if agreement is not None:  # per prompt (the headline), and pooled over all pairs
        metrics["rm_gold_agreement"], metrics["rm_gold_agreement_pooled"] = agreement
    summary = build_summary(STAGE, to_dict(cfg), metrics, started, policy=policy, prompts=source)
    out.commit(summary)
    log.info("label: %s", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()))
    if lab.labeler == "human":
        log.info("label: wrote %s; rank it with `python -m pipeline label --serve --config ...` "
                 "(make label-serve)", out.final_dir / "to_label.jsonl")
    else:
        log.info("label: wrote %s; train on it with make rm ARGS=\"rm.data.train=%s\"", out.final_dir,
                 out.final_dir / "rankings.jsonl")
    return metrics


def _judge_agreement(reward_model: str, policy_dir: Path, state: PartialState) -> tuple[float, float] | None:
    """How well the reward model that judged this policy orders its held-out samples like the gold reward (the
    rm stage's own measure, on the policy dir's samples.jsonl): low means the policy outran its reward model."""
    model, tokenizer = load_reward_model(reward_model)
    model.to(state.device)
    summary = Path(reward_model) / "summary.json"  # score at the length the reward model was trained with
    trained = json.loads(summary.read_text()).get("config", {}).get("rm", {}) if summary.is_file() else {}
    max_length = trained.get("max_length") or context_length(model) or 512
    return samples_agreement(lambda rankings: score_rankings(model, rankings, tokenizer.pad_token_id, 16, state),
                             tokenizer, policy_dir, max_length)


def _policy(cfg: Config) -> tuple[str, str | None]:
    """The policy directory and the make target that builds it (none for a directory of the user's)."""
    if cfg.label.policy in ("sft", "ppo"):
        return str(cfg.stage_dir(cfg.label.policy)), f"{cfg.label.policy} PROFILE={cfg.profile}"
    return cfg.label.policy, None


def _keep_human_rankings(cfg: Config) -> None:
    """Rebuilding the stage replaces its directory; never let that throw away rankings people made."""
    path = cfg.stage_dir(STAGE) / "rankings.jsonl"
    summary = cfg.stage_dir(STAGE) / "summary.json"
    if not (path.is_file() and summary.is_file()):
        return
    built_for = json.loads(summary.read_text())["config"]["label"]["labeler"]
    n = sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())
    if built_for == "human" and n:
        raise ConfigError(
            f"{path} holds {n} rankings made by people on the current to-label file, and rebuilding the label "
            f"stage would replace that directory: move the file elsewhere first (e.g. mv {path} "
            f"data/rankings-{time.strftime('%Y%m%d')}.jsonl), then run again"
        )


def _draw(rows: list[dict], n: int, seed: int, distinct: bool = True) -> list[dict]:
    """`n` prompts in an order shuffled by the seed (all of them when the source has fewer): each distinct
    prompt once, or (`distinct` false) the source's rows with their repeats, a prompt as often as it occurs."""
    if distinct:
        seen: dict[str, dict] = {}
        for row in rows:
            seen.setdefault(json.dumps(row.get("messages") or row.get("prompt")), row)
        rows = list(seen.values())
    else:
        rows = list(rows)
    random.Random(f"label:{seed}").shuffle(rows)
    if len(rows) < n:
        log.info("label: the prompt source has %d %s (label.num_prompts=%d): using all", len(rows),
                 "distinct prompts" if distinct else "rows", n)
    return rows[:n]


def _sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], lab: LabelConfig,
            seed: int, state: PartialState) -> list[list[Sample]]:
    """`lab.k` samples of each prompt, chunk c on process c mod N, seeded by c; gathered on every process."""
    gen = GenerationEvalConfig(num_prompts=len(texts), samples_per_prompt=lab.k, max_new_tokens=lab.max_new_tokens,
                               temperature=lab.temperature, batch_size=lab.batch_size)
    starts = range(0, len(texts), lab.batch_size)
    mine = []
    for c, start in enumerate(starts):
        if c % state.num_processes != state.process_index:
            continue
        batch = texts[start : start + lab.batch_size]
        samples = sample_completions(model, tokenizer, batch, gen, seed * 1_000_003 + c, show_progress=False)
        mine.append((c, [samples[i * lab.k : (i + 1) * lab.k] for i in range(len(batch))]))
        if state.is_main_process:
            log.info("label: sampled %d of %d prompts", min(start + lab.batch_size, len(texts)), len(texts))
    chunks = gather_object(mine) if state.num_processes > 1 else mine
    return [per_prompt for _, chunk in sorted(chunks, key=lambda x: x[0]) for per_prompt in chunk]


def _items(rendered: list[tuple[str, str]], samples: list[list[Sample]], gold: Any,
           k: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The to-label items (distinct non-empty completions, >= 2 per prompt) and what was dropped."""
    items: list[dict[str, Any]] = []
    empty = duplicate = too_few = 0
    golds: list[float] = []
    ended_all: list[bool] = []
    for (text, plain), per_prompt in zip(rendered, samples, strict=True):
        kept: dict[str, Sample] = {}
        for s in per_prompt:
            ended_all.append(s.ended)
            if gold is not None:
                golds.append(gold(plain, s.completion, s.ended))
            if not s.completion.strip():
                empty += 1
            elif s.completion in kept:
                duplicate += 1
            else:
                kept[s.completion] = s
        if len(kept) < 2:
            too_few += 1
            continue
        completions = list(kept)
        item: dict[str, Any] = {"id": labeling.item_id(len(items), text, completions), "prompt": text,
                                "completions": completions, "ended": [kept[c].ended for c in completions]}
        if gold is not None:
            item["gold"] = [gold(plain, c, kept[c].ended) for c in completions]
        items.append(item)
    counts: dict[str, Any] = {"prompts": len(rendered), "samples": len(rendered) * k,
                              "empty_completions": empty, "duplicate_completions": duplicate,
                              "prompts_dropped_too_few_distinct": too_few,
                              "eos_rate": sum(ended_all) / max(len(ended_all), 1)}
    if golds:
        counts["gold_score"] = sum(golds) / len(golds)  # of every sample: the policy's gold on these prompts
    return items, counts


def _gold_label(items: list[dict[str, Any]], lab: LabelConfig, seed: int) -> tuple[list[dict], dict[str, Any]]:
    """Rank every item by gold (with the configured noise); drop the all-tie ones; measure the flip rate."""
    rng = random.Random(f"label-noise:{seed}")
    labeler = f"gold(noise={lab.noise:g})"
    rankings = []
    all_tied = flipped = comparisons = 0
    for item in items:
        ranks = labeling.gold_ranks(item["gold"], lab.noise, lab.tie_threshold, rng)
        if len(set(ranks)) == 1:
            all_tied += 1  # the reward model's loader rejects a row without a comparison
            continue
        f, c = labeling.flips_against_gold(item["gold"], ranks, lab.tie_threshold)
        flipped, comparisons = flipped + f, comparisons + c
        rankings.append({"id": item["id"], "prompt": item["prompt"], "completions": item["completions"],
                         "ranks": ranks, "labeler": labeler})
    if not rankings:
        raise ConfigError(f"every one of the {len(items)} items is a tie under the gold reward (within "
                          f"label.tie_threshold={lab.tie_threshold}): no comparison to train a reward model on")
    return rankings, {"rankings": len(rankings), "dropped_all_tied": all_tied, "comparisons": comparisons,
                      "flip_rate": flipped / comparisons, "noise": lab.noise}
