"""`python -m pipeline <stage> --dry-run`: check a stage's config and data, and show what the model would see.

A dry run loads every data source the stage reads (train, held-out; for rm the demonstrations the reward is
normalized on, for ppo the ptx corpus and the held-out corpus), tokenizes and collates them with the stage's
own functions, prints counts (rows, prompts, K, comparisons, tokens, what `max_length` truncates or drops)
and one example rendered exactly as the model receives it, then exits. It trains nothing and writes nothing:
no stage directory, no stamp, no W&B run, no cache under the run directory.

It never loads model weights. The tokenizer is the one the stage would train with: its init (the previous
stage's output, or `<stage>.init`) when that is a finished model or a hub id; while the previous stage is not
built yet (a fresh clone), the tokenizer that stage will save, i.e. in the end the base model's, which for the
tiny profile is the byte-level BPE trained in memory on `tokenizer.train_data` exactly as pretrain trains it.
The model's context length comes from its `config.json` (or `model.tiny.n_positions`).

Everything that shapes the tokens comes from the stage modules (`load_data`, `sft.prepare_examples`, which
runs TRL's own SFT preparation, `ranking.encode_rankings`, `rollout.encode_prompts`, `data.pack_corpus`'s two
halves), so a dry run cannot show something else than what trains.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import datasets
import torch
from transformers import AutoConfig, PreTrainedTokenizerBase, default_data_collator
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from pipeline import ranking
from pipeline.config import Config, ConfigError
from pipeline.data import pack_tokenized, tokenize_corpus
from pipeline.evaluation import check_gold_covers, gold_function, render_prompt
from pipeline.modeling import (
    ModelLoadError,
    _first_line,
    _require_finished,
    context_length,
    distinct_pad_token,
    load_base_tokenizer,
    load_tokenizer,
)
from pipeline.packing import RowPackedCollator
from pipeline.rollout import encode_prompts
from pipeline.stages import ppo, pretrain, rm, sft

# The stage whose output each stage starts from by default, and the key that overrides it.
PREVIOUS = {"sft": "pretrain", "rm": "sft", "ppo": "sft"}
TABLE_TOKENS = 64  # per-token table rows shown for the SFT example; longer examples show their start


class Printer:
    """Plain text, with ANSI colour only on a terminal (and not under NO_COLOR), so a pipe or a log file
    reads the same marks (`[[...]]`) without escape codes."""

    def __init__(self, out: TextIO):
        self.out = out
        self.color = out.isatty() and "NO_COLOR" not in os.environ

    def __call__(self, text: str = "") -> None:
        print(text, file=self.out)

    def _ansi(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color and text else text

    def dim(self, text: str) -> str:
        return self._ansi("2", text)

    def bold(self, text: str) -> str:
        return self._ansi("1", text)

    def green(self, text: str) -> str:
        return self._ansi("32", text)

    def block(self, text: str, indent: str = "    | ") -> None:
        """Multi-line model text, each line behind a gutter so leading/trailing newlines stay visible."""
        for line in text.split("\n"):
            self(indent + line)


def run(cfg: Config, stage: str, out: TextIO | None = None) -> None:
    """Dry-run `stage`: validate, count and render; raises ConfigError / DataError / ModelLoadError like the stage."""
    datasets.disable_progress_bars()  # the dry run's output is its report; no tokenizing bars in between
    p = Printer(out or sys.stdout)
    p(p.bold(f"dry run of {stage} (profile {cfg.profile}): nothing is trained or written"))
    p(f"config: valid (every key, type and bound checked); run_dir {cfg.run_dir}")
    {"pretrain": _pretrain, "sft": _sft, "rm": _rm, "ppo": _ppo}[stage](cfg, p)
    p()
    p(p.bold(f"dry run of {stage}: config and data OK"))


# ------------------------------------------------------------------------------------------------ tokenizer


def stage_tokenizer(cfg: Config, stage: str) -> tuple[PreTrainedTokenizerBase, str, int | None]:
    """(tokenizer, where it comes from, the model's context length) of `stage`, without loading any weights."""
    tokenizer, what, context, unbuilt = _find_tokenizer(cfg, stage)
    if unbuilt:
        also = f", nor {', '.join(unbuilt[1:])}" if len(unbuilt) > 1 else ""
        what = f"the one {unbuilt[0]} will carry (not built yet{also}): {what}"
    if stage == "rm":
        distinct_pad_token(tokenizer)  # as `load_reward_model` does: the reward is read at the EOS, EOS cannot pad
    return tokenizer, what, context


def _find_tokenizer(cfg: Config, stage: str) -> tuple[PreTrainedTokenizerBase, str, int | None, list[str]]:
    """`stage_tokenizer` before the rm pad token, plus the unbuilt stage directories walked past: a stage saves
    its init's tokenizer, so while the previous stage is not built its own init's tokenizer is the one."""
    if stage == "pretrain":
        tokenizer = load_base_tokenizer(cfg.model, cfg.tokenizer, cfg.datasets)
        if cfg.model.name_or_path is None:
            what = (f"tokenizer '{cfg.tokenizer.name_or_path}'" if cfg.tokenizer.name_or_path else
                    f"the tiny byte-level BPE, trained in memory on tokenizer.train_data={cfg.tokenizer.train_data} "
                    f"exactly as pretrain trains it (not saved)")
            return tokenizer, what, cfg.model.tiny.n_positions, []
        source = cfg.tokenizer.name_or_path or cfg.model.name_or_path
        return tokenizer, f"'{source}' (the base model's)", _context(cfg.model.name_or_path, cfg.model.revision), []
    previous = PREVIOUS[stage]
    init = getattr(cfg, stage).init
    path = init or str(cfg.stage_dir(previous))
    if init or (Path(path) / "config.json").is_file():
        _require_finished(path, None)  # an explicit local init must be a finished model, as the stage requires
        what = f"{path} ({stage}.init)" if init else f"{path} (the finished {previous} stage)"
        return load_tokenizer(path), what, _context(path), []
    tokenizer, what, context, unbuilt = _find_tokenizer(cfg, previous)
    return tokenizer, what, context, [path, *unbuilt]


def _context(name_or_path: str, revision: str | None = None) -> int | None:
    """The context length from the model's config.json alone."""
    try:
        return context_length(AutoConfig.from_pretrained(name_or_path, revision=revision))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the config of model '{name_or_path}': {_first_line(e)}") from None


def _tokenizer_line(p: Printer, tokenizer: PreTrainedTokenizerBase, what: str, context: int | None) -> None:
    p(f"tokenizer: {what}")
    p(f"  {len(tokenizer)} tokens; EOS {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
      f"pad {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}); model context {context or 'unknown'} positions")


def _check_fits(value: int, key: str, context: int | None) -> None:
    """The stages' own check (with the loaded model there, with its config.json here)."""
    if context and value > context:
        raise ConfigError(f"'{key}' ({value}) exceeds the model's context ({context})")


# ------------------------------------------------------------------------------------------------ formatting


def _stats(lengths: Sequence[int], unit: str = "row") -> str:
    if not lengths:
        return "none"
    return (f"{sum(lengths):,} total; per {unit} min {min(lengths)} / mean {statistics.fmean(lengths):.1f} / "
            f"max {max(lengths)}")


def _token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return repr(tokenizer.decode([token_id], skip_special_tokens=False))


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def mark_labels(p: Printer, tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], labels: Sequence[int]) -> str:
    """The decoded text with every run of masked tokens (label -100: context, no loss) inside `[[...]]`
    (dim on a terminal) and the trained tokens plain (green on a terminal)."""
    parts = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == -100) != (labels[start] == -100):
            text = _decode(tokenizer, ids[start:i])
            parts.append(p.dim(f"[[{text}]]") if labels[start] == -100 else p.green(text))
            start = i
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ pretrain


def _pretrain(cfg: Config, p: Printer) -> None:
    c = cfg.pretrain
    train, held_out = pretrain.load_data(cfg)
    tokenizer, what, context = stage_tokenizer(cfg, "pretrain")
    _tokenizer_line(p, tokenizer, what, context)
    _check_fits(c.block_size, "pretrain.block_size", context)
    blocks = None
    for key, corpus in (("pretrain.data.train", train), ("pretrain.data.eval", held_out)):
        if corpus is None:
            p(f"\n{key}: none (no held-out evaluation)")
            continue
        packed = _corpus_report(p, key, getattr(c.data, key.rsplit(".", 1)[1]), corpus, tokenizer,
                                c.block_size, "pretrain.block_size")
        blocks = blocks if blocks is not None else packed
    assert blocks is not None
    batch = default_data_collator([blocks[i] for i in range(min(c.batch_size, len(blocks)))])
    ids = batch["input_ids"][0].tolist()
    p()
    p(p.bold(f"example: training block 1 of {len(blocks)}, as the model sees it ({len(ids)} tokens)"))
    p(f"  first batch: input_ids {list(batch['input_ids'].shape)} (pretrain.batch_size={c.batch_size} blocks); "
      "labels = input_ids (the model shifts them): every token is trained; documents end with EOS")
    p.block(_decode(tokenizer, ids))


def _corpus_report(p: Printer, key: str, source: str, corpus: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                   block_size: int, block_key: str) -> datasets.Dataset:
    """Documents, tokens and packed blocks of a corpus, tokenized and packed by `data.pack_corpus`'s two halves."""
    tokenized = tokenize_corpus(corpus, tokenizer)
    lengths = [len(x) for x in tokenized["ids"]]
    packed = pack_tokenized(tokenized, block_size, block_key)
    dropped = sum(lengths) - len(packed) * block_size
    p()
    p(f"{key}: {source}")
    p(f"  documents: {len(corpus):,}")
    p(f"  tokens (EOS appended to each document): {_stats(lengths, 'document')}")
    p(f"  packed: {len(packed):,} blocks of {block_key}={block_size} tokens; {dropped:,} tokens dropped "
      "(each 1000-document group's remainder shorter than a block; no document is truncated otherwise)")
    return packed


# ------------------------------------------------------------------------------------------------ sft


def _sft(cfg: Config, p: Printer) -> None:
    s = cfg.sft
    train, held_out, conversational = sft.load_data(cfg)
    tokenizer, what, context = stage_tokenizer(cfg, "sft")
    _tokenizer_line(p, tokenizer, what, context)
    _check_fits(s.max_length, "sft.max_length", context)
    if context:  # the stage refuses a prompt longer than the context: so does its dry run
        sft.check_prompt_lengths(cfg, train, "train", tokenizer, context)
        if held_out is not None:
            sft.check_prompt_lengths(cfg, held_out, "eval", tokenizer, context)
    if held_out is not None:
        gold_rows = sft._unique_prompts(list(held_out))[: s.generation.num_prompts]
        check_gold_covers(gold_function(cfg.gold_reward), gold_rows, tokenizer, "sft.data.eval")
    args = sft.trl_args(cfg, cfg.stage_dir("sft"), held_out is not None, conversational)
    loss = ("assistant turns only (the chat template's {% generation %} spans)" if conversational
            else "completion only (prompt tokens masked)")
    p(f"format: {'conversational (messages)' if conversational else 'prompt-completion'}; loss on the {loss}")
    # Per demonstration first (packing only places the same examples side by side), then what packing makes.
    unpacked = copy.copy(args)
    unpacked.packing, unpacked.eval_packing = False, False
    prepared = packed = None
    for key, rows, name in (("sft.data.train", train, "train"), ("sft.data.eval", held_out, "eval")):
        if rows is None:
            p(f"\n{key}: none (no held-out loss or generation evaluation)")
            continue
        examples = _sft_report(p, key, getattr(s.data, name), rows, tokenizer, unpacked, name)
        if args.packing and name == "train" and len(examples):  # the held-out set is not packed
            packed = sft.prepare_examples(rows, tokenizer, args, name)
            tokens = sum(len(x) for x in packed["input_ids"])
            p(f"  sft.packing: {len(examples):,} examples packed into {len(packed):,} rows of at most "
              f"{args.max_length} tokens ({100 * tokens / (len(packed) * args.max_length):.0f} % full), no padding")
        prepared = prepared if prepared is not None else examples
    assert prepared is not None
    if len(prepared) == 0:
        raise ConfigError(f"no row of 'sft.data.train' keeps a trained token within sft.max_length={s.max_length}")

    # The first batch exactly as the Trainer's collator builds it (packed: the first packed rows, position ids
    # restarting at each demonstration); the example is the first demonstration, as unpacked.
    pad = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.convert_tokens_to_ids(pad),
                                               pad_to_multiple_of=args.pad_to_multiple_of)
    batch = collator([prepared[i] for i in range(min(s.batch_size, len(prepared)))])
    n = int(batch["attention_mask"][0].sum())
    ids, labels = batch["input_ids"][0, :n].tolist(), batch["labels"][0, :n].tolist()
    trained = sum(label != -100 for label in labels)
    p()
    p(p.bold(f"example: the first training example, as the model sees it ({n} tokens: {n - trained} masked, "
             f"{trained} trained)"))
    if packed is not None:  # the train set's packed rows, from the report above
        rows_in_batch = min(s.batch_size, len(packed))
        first = RowPackedCollator(tokenizer.convert_tokens_to_ids(pad), args.pad_to_multiple_of)(
            [packed[i] for i in range(rows_in_batch)])
        in_batch = sum(len(x) for x in packed[:rows_in_batch]["seq_lengths"])
        p(f"  first batch: input_ids {list(first['input_ids'].shape)} (sft.packing: {rows_in_batch} packed rows "
          f"holding {in_batch} examples, position ids restarting at each; the example is one of them)")
    else:
        p(f"  first batch: input_ids {list(batch['input_ids'].shape)} (sft.batch_size={s.batch_size} rows, "
          f"right-padded with {pad!r})")
    p("  legend: " + p.dim("[[masked]]") + " = context only (label -100, no loss); plain = trained (label) tokens")
    p.block(mark_labels(p, tokenizer, ids, labels))
    p(f"  per token (first {min(n, TABLE_TOKENS)} of {n}):")
    p(f"    {'pos':>4}  {'id':>6}  {'token':<24} label")
    for i, (t, label) in enumerate(zip(ids[:TABLE_TOKENS], labels, strict=False)):
        mark = p.green("trained") if label != -100 else p.dim("masked (-100)")
        p(f"    {i:>4}  {t:>6}  {_token(tokenizer, t):<24} {mark}")


def _sft_report(p: Printer, key: str, source: str, rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                args: Any, name: str) -> datasets.Dataset:
    """Counts of one demonstrations source; returns its examples exactly as SFTTrainer prepares them."""
    # Prepared twice by TRL: without max_length for the lengths before truncation, then as training does.
    whole = copy.copy(args)
    whole.max_length = None
    full = sft.prepare_examples(rows, tokenizer, whole, name)
    kept = sft.prepare_examples(rows, tokenizer, args, name)
    lengths = [len(x) for x in full["input_ids"]]
    truncated = sum(n > args.max_length for n in lengths)
    dropped = len(full) - len(kept)
    kept_tokens = [len(x) for x in kept["input_ids"]]
    trained = sum(sum(label != -100 for label in x) for x in kept["labels"])
    p()
    p(f"{key}: {source}")
    p(f"  rows: {len(rows):,}; prompts: {_distinct_prompts(rows):,} distinct")
    p(f"  tokens before truncation: {_stats(lengths)}")
    p(f"  sft.max_length={args.max_length}: {truncated:,} rows truncated (their end cut: longer than max_length), "
      f"{dropped:,} rows dropped (no trained token left after truncation)")
    used = "trains on" if name == "train" else "held-out loss on"
    p(f"  {used}: {len(kept):,} rows, {sum(kept_tokens):,} tokens of which {trained:,} are labels (not masked)")
    return kept


def _distinct_prompts(rows: datasets.Dataset) -> int:
    return len(sft._unique_prompts(list(rows)))


# ------------------------------------------------------------------------------------------------ rm


def _rm(cfg: Config, p: Printer) -> None:
    r = cfg.rm
    train_rows, eval_rows, demo_source, demos = rm.load_data(cfg)
    tokenizer, what, context = stage_tokenizer(cfg, "rm")
    _tokenizer_line(p, tokenizer, what, context)
    _check_fits(r.max_length, "rm.max_length", context)
    if eval_rows is not None:
        check_gold_covers(gold_function(cfg.gold_reward), [{"prompt": x} for x in eval_rows["prompt"]], tokenizer,
                          "rm.data.eval")
    train = ranking.encode_rankings(train_rows, tokenizer, r.max_length, "rm.data.train", cfg.chat_prompts)
    held_out = (ranking.encode_rankings(eval_rows, tokenizer, r.max_length, "rm.data.eval", cfg.chat_prompts)
                if eval_rows else [])
    p("each completion is read as prompt + completion + EOS; the reward is the scalar head's output at that EOS")
    _rankings_report(p, "rm.data.train", r.data.train, train, r.max_length)
    if eval_rows is None:
        p("\nrm.data.eval: none (no held-out accuracy)")
    else:
        _rankings_report(p, "rm.data.eval", r.data.eval or "", held_out, r.max_length)
    p()
    if demos is None:
        p("normalization: none (rm.normalize_data and sft.data.eval are null): rewards stay unnormalized")
    else:
        examples = ranking.encode_demonstrations(demos, tokenizer, r.max_length)
        lengths = [len(x.input_ids[0]) for x in examples]
        p(f"normalization data (the reward is shifted so these average 0): {demo_source}")
        p(f"  demonstrations: {len(examples):,}; tokens: {_stats(lengths)}; "
          f"{sum(x.truncated for x in examples):,} truncated to rm.max_length={r.max_length}")

    # The first prompt's completions, collated exactly as a training batch.
    example = train[0]
    batch = ranking.RankingCollator(tokenizer.pad_token_id)([example])
    ids = batch["input_ids"]
    # Where the reward is read: the sequence-classification head pools the last non-padding token
    # (transformers' rule: the last position whose id is not config.pad_token_id).
    read_at = ((ids != tokenizer.pad_token_id).int() * torch.arange(ids.shape[1])).argmax(-1)
    k = len(example.completions)
    p()
    p(p.bold(f"example: training prompt 1, its K={k} completions as the reward model sees them"))
    p("  prompt:")
    p.block(example.prompt)
    p("  completions (rank 1 = best; equal ranks are ties):")
    for j in sorted(range(k), key=lambda j: example.ranks[j]):
        p(f"    c{j + 1}  rank {example.ranks[j]}  {example.completions[j]!r}")
    pairs = ", ".join(f"c{w + 1} > c{lo + 1}" for w, lo in example.pairs)
    total = k * (k - 1) // 2
    p(f"  comparisons (winner > loser): {len(example.pairs)} of {total} pairs"
      f"{f' ({total - len(example.pairs)} tied, no comparison)' if total > len(example.pairs) else ''}: {pairs}")
    p(f"  tokenized (batch input_ids {list(ids.shape)}, right-padded with {tokenizer.pad_token!r}); "
      "the reward is read at the token in [[...]]:")
    for j in range(k):
        n = int(batch["attention_mask"][j].sum())
        at = int(read_at[j])
        text = _decode(tokenizer, ids[j, :at].tolist()) + "[[" + _decode(tokenizer, [int(ids[j, at])]) + "]]"
        p(f"    c{j + 1} (rank {example.ranks[j]}, {n} tokens, reward read at position {at}: "
          f"{_token(tokenizer, int(ids[j, at]))}, id {int(ids[j, at])}):")
        p.block(text, indent="      | ")


def _rankings_report(p: Printer, key: str, source: str, rankings: Sequence[ranking.Ranking], max_length: int) -> None:
    ks = Counter(len(x.completions) for x in rankings)
    pairs = sum(len(x.pairs) for x in rankings)
    ties = sum(len(x.completions) * (len(x.completions) - 1) // 2 - len(x.pairs) for x in rankings)
    lengths = [len(s) for x in rankings for s in x.input_ids]
    truncated = sum(x.truncated for x in rankings)
    p()
    p(f"{key}: {source}")
    p(f"  prompts: {len(rankings):,}; completions: {len(lengths):,}; "
      f"K distribution: {', '.join(f'K={k}: {n:,}' for k, n in sorted(ks.items()))}")
    p(f"  comparisons: {pairs:,} (every differently ranked pair; {ties:,} tied pairs give none)")
    p(f"  tokens per sequence (prompt + completion + EOS, after truncation): {_stats(lengths, 'sequence')}")
    p(f"  rm.max_length={max_length}: {truncated:,} completions truncated (the prompt's start is cut first, then "
      "the completion's end; the EOS always stays), 0 dropped")


# ------------------------------------------------------------------------------------------------ ppo


def _ppo(cfg: Config, p: Printer) -> None:
    c = cfg.ppo
    train_rows, eval_rows, ptx_corpus, ptx_eval_corpus = ppo.load_data(cfg)
    tokenizer, what, context = stage_tokenizer(cfg, "ppo")
    _tokenizer_line(p, tokenizer, what, context)
    if context and c.max_prompt_length + c.max_new_tokens > context:  # as `ppo._check_models` says it
        raise ConfigError(f"'ppo.max_prompt_length' + 'ppo.max_new_tokens' ({c.max_prompt_length} + "
                          f"{c.max_new_tokens}) exceed the policy's context ({context})")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the policy's tokenizer has no EOS token: completions could never end")
    rm_path = c.reward_model or str(cfg.stage_dir("rm"))
    built = (Path(rm_path) / "config.json").is_file() or bool(c.reward_model)
    p(f"reward model: {rm_path}{'' if built else ' (not built yet: make rm)'}; "
      f"value model from {c.value_init or rm_path}")
    gold = gold_function(cfg.gold_reward)
    check_gold_covers(gold, eval_rows, tokenizer, "ppo.data.eval")
    check_gold_covers(gold, train_rows, tokenizer, "ppo.data.train")
    train_prompts = [render_prompt(x, tokenizer)[0] for x in train_rows]
    _prompts_report(p, "ppo.data.train", c.data.train, train_prompts, tokenizer, c.max_prompt_length)
    sampled = c.iterations * c.rollout_batch_size
    p(f"  rollouts: ppo.iterations={c.iterations} x ppo.rollout_batch_size={c.rollout_batch_size} = {sampled:,} "
      f"prompts sampled per process ({sampled / len(train_prompts):.1f} passes over these prompts)")
    if eval_rows:
        eval_prompts = [render_prompt(x, tokenizer)[0] for x in eval_rows]
        _prompts_report(p, "ppo.data.eval", c.data.eval or "", eval_prompts, tokenizer, c.max_prompt_length,
                        f" (the first ppo.eval_prompts={c.eval_prompts}, {c.eval_samples_per_prompt} samples each)")
    else:
        p("\nppo.data.eval: none (no held-out evaluation)")
    ptx_blocks = None
    if ptx_corpus is None:
        p("\nptx corpus: none (ppo.ptx_coef=0: plain PPO, no pretraining term)")
    else:
        ptx_blocks = _corpus_report(p, f"ptx corpus (ppo.ptx_coef={c.ptx_coef})", ppo.ptx_source(cfg), ptx_corpus,
                                    tokenizer, c.ptx_block_size, "ppo.ptx_block_size")
        p(f"  ppo.ptx_batch_size={c.ptx_batch_size} blocks per optimizer step")
    if ptx_eval_corpus is None:
        p("\nheld-out corpus: none (no corpus-loss evaluation)")
    else:
        blocks = _corpus_report(p, "held-out corpus (eval/corpus_loss)", ppo.ptx_eval_source(cfg) or "",
                                ptx_eval_corpus, tokenizer, c.ptx_block_size, "ppo.ptx_block_size")
        p(f"  evaluated: the first {min(len(blocks), c.eval_corpus_blocks):,} blocks (ppo.eval_corpus_blocks)")

    enc = encode_prompts(tokenizer, train_prompts[:1], c.max_prompt_length, torch.device("cpu"))
    ids = enc["input_ids"][0].tolist()
    p()
    p(p.bold(f"example: training prompt 1, exactly as fed to generation ({len(ids)} tokens, "
             f"ppo.max_prompt_length={c.max_prompt_length})"))
    p(f"  ids: {ids}")
    p.block(_decode(tokenizer, ids))
    p(f"  the policy then samples up to ppo.max_new_tokens={c.max_new_tokens} tokens, stopping at EOS")
    if ptx_blocks is not None:
        block = ptx_blocks[0]["input_ids"]
        p()
        p(p.bold(f"example: ptx block 1 of {len(ptx_blocks)} ({len(block)} tokens; an LM loss on every token)"))
        p.block(_decode(tokenizer, block))


def _prompts_report(p: Printer, key: str, source: str, prompts: list[str], tokenizer: PreTrainedTokenizerBase,
                    max_prompt_length: int, note: str = "") -> None:
    lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    truncated = sum(n > max_prompt_length for n in lengths)
    p()
    p(f"{key}: {source}{note}")
    p(f"  prompts: {len(prompts):,} ({len(set(prompts)):,} distinct)")
    p(f"  tokens (after the chat template, if any): {_stats(lengths, 'prompt')}")
    p(f"  ppo.max_prompt_length={max_prompt_length}: {truncated:,} prompts truncated (their start cut), 0 dropped")
