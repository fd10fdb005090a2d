"""Talk to a finished stage's policy in the terminal: `python -m pipeline chat runs/<profile>/ppo` (`make chat`).

The model sees exactly the prompts it was trained on, rendered the way the stages render them
(`pipeline.evaluation.render_prompt`, used by SFT's evaluation and by PPO's rollouts):
- a policy trained on conversations (`messages` rows: the `conversational` flag in its summary.json, or in
  the summary of the SFT model a PPO run started from) gets the whole conversation so far through its
  tokenizer's chat template with the generation prompt appended, and answers join the history;
- a policy trained on plain prompt→completion text (the tiny profile) gets each line on its own, as the
  prompt string `--prompt-format` builds from it (default: the line and its newline, as the tiny task's
  prompts `count to five\\n` are written); it has no history, because it never saw one in training.
Prompts are tokenized without special tokens, as in training; the reply stops at EOS or after
`--max-new-tokens` tokens, and a reply that never emitted EOS is flagged.

Lines come from stdin one at a time, so a session can be scripted (`echo "count to five" | ... chat DIR`).
Replies go to stdout, one per prompt; everything else (banner, notes, `--show-prompt`) goes to stderr.
Commands: /reset (forget the conversation), /help, /quit (or end of input).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer, set_seed
from transformers.utils import logging as hf_logging

from pipeline.config import STAGES
from pipeline.modeling import DTYPES, ModelLoadError, context_length, load_causal_lm

POLICY_STAGES = ("pretrain", "sft", "ppo")  # the stages whose output is a causal LM
COMMANDS = "/reset forgets the conversation, /help shows this, /quit (or Ctrl-D) ends"


class ChatError(Exception):
    """A directory that cannot be chatted with; the message says why and what to do."""


@dataclass
class Options:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    prompt_format: str = "{text}\n"
    system: str | None = None


@dataclass
class Reply:
    text: str
    ended: bool  # the model emitted EOS within the budget
    prompt: str  # the exact text the model was given (after trimming to its context)
    dropped_turns: int = 0  # earliest conversation turns left out to fit the context


def finished_stage(path: Path) -> dict[str, Any]:
    """The summary.json of a finished pretrain, sft or ppo output directory; ChatError for anything else."""
    stage_hint = path.name.removesuffix(".partial")
    make = f": build it with `make {stage_hint}`" if stage_hint in STAGES else ""
    if not path.is_dir():
        raise ChatError(f"no directory {path}{make}")
    summary_path = path / "summary.json"
    if path.name.endswith(".partial") or not summary_path.is_file():
        raise ChatError(f"{path} is not a finished stage (no summary.json: a stage writes it last){make}")
    summary = json.loads(summary_path.read_text())
    stage = summary.get("stage")
    if stage == "rm":
        raise ChatError(f"{path} is a reward model: it scores text, it does not write any; "
                        f"chat with a pretrain, sft or ppo output, e.g. {path.parent / 'ppo'}")
    if stage not in POLICY_STAGES:
        raise ChatError(f"{path}/summary.json names stage {stage!r}; chat needs a pretrain, sft or ppo output")
    return summary


def trained_on_conversations(path: Path, summary: dict[str, Any]) -> bool:
    """Whether the policy learned from `messages` rows (chat template) rather than plain prompt→completion text.

    SFT and PPO record it in summary.json; a PPO output without the flag inherits it from the SFT model it
    started from. Pretraining sees plain text only.
    """
    if "conversational" in summary:
        return bool(summary["conversational"])
    init = summary.get("init")
    if summary.get("stage") == "ppo" and init and (Path(init) / "summary.json").is_file():
        return bool(json.loads((Path(init) / "summary.json").read_text()).get("conversational"))
    return False


def default_max_new_tokens(summary: dict[str, Any]) -> int:
    """The completion budget the stage sampled with (PPO's rollouts, SFT's evaluation); 64 otherwise."""
    config = summary.get("config", {})
    if summary.get("stage") == "ppo":
        return int(config.get("ppo", {}).get("max_new_tokens", 64))
    if summary.get("stage") == "sft":
        return int(config.get("sft", {}).get("generation", {}).get("max_new_tokens", 64))
    return 64


@dataclass
class Session:
    """One conversation with a policy: renders prompts as in training, samples, keeps the history."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    conversational: bool
    options: Options
    messages: list[dict[str, str]] = field(default_factory=list)
    stream: TextIO | None = None  # where to print tokens as they come (a terminal), or None

    def reset(self) -> None:
        self.messages = []

    def render(self, line: str) -> tuple[str, list[dict[str, str]]]:
        """The prompt text for `line` (and, for a chat model, the conversation it renders)."""
        if not self.conversational:
            return self.options.prompt_format.replace("{text}", line), []
        system = [{"role": "system", "content": self.options.system}] if self.options.system else []
        turns = [*self.messages, {"role": "user", "content": line}]
        return self._template(system + turns), turns

    def _template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def reply(self, line: str) -> Reply:
        text, turns = self.render(line)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        context = context_length(self.model)
        budget = context - self.options.max_new_tokens if context else None
        dropped = 0
        if budget is not None and budget < 1:
            raise ChatError(f"--max-new-tokens {self.options.max_new_tokens} leaves no room for a prompt "
                            f"in the model's context of {context} tokens")
        # A conversation too long for the context loses its earliest exchanges first, whole turns at a time.
        while budget is not None and len(ids) > budget and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            dropped += 2
            system = [{"role": "system", "content": self.options.system}] if self.options.system else []
            text = self._template(system + turns)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if budget is not None and len(ids) > budget:
            ids = ids[-budget:]  # as PPO truncates prompts: the end, next to the completion, is kept
            text = self.tokenizer.decode(ids)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        sampling = {} if self.options.greedy else {
            "temperature": self.options.temperature, "top_k": self.options.top_k, "top_p": self.options.top_p}
        streamer = (TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
                    if self.stream is not None else None)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=not self.options.greedy,
            max_new_tokens=self.options.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
        new = out[0, input_ids.shape[1]:].cpu()
        eos = (new == self.tokenizer.eos_token_id).nonzero()
        end = int(eos[0]) if len(eos) else len(new)
        answer = self.tokenizer.decode(new[:end], skip_special_tokens=True)
        if self.conversational:
            self.messages = [*turns, {"role": "assistant", "content": answer}]
        return Reply(answer, bool(len(eos)), text, dropped)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline chat",
        description="Talk to a finished stage's policy (pretrain, sft or ppo output) in the terminal. "
        "Lines are read from stdin; replies go to stdout. " + COMMANDS + ".",
    )
    p.add_argument("dir", type=Path, help="a finished stage directory, e.g. runs/tiny/ppo")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0, what the held-out evaluation samples at)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="reply budget in tokens (default: what the stage sampled with: ppo.max_new_tokens, "
                   "sft.generation.max_new_tokens; 64 for pretrain)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (a scripted session repeats exactly)")
    p.add_argument("--mode", choices=("auto", "chat", "plain"), default="auto",
                   help="auto: as the policy was trained (summary.json); chat: through the chat template with "
                   "history; plain: each line as a prompt string of its own")
    p.add_argument("--prompt-format", default="{text}\\n",
                   help="plain mode: the prompt built from your line ({text}; \\n is a newline). Default "
                   "'{text}\\n': the line as typed, Enter included, as the tiny task's prompts are written")
    p.add_argument("--system", default=None, help="chat mode: a system message opening the conversation")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the exact text given to the model before each reply (to stderr)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="weights dtype (default: as saved)")
    args = p.parse_args(argv)
    for name, ok in (("--temperature", args.temperature > 0), ("--top-k", args.top_k >= 0),
                     ("--top-p", 0 < args.top_p <= 1),
                     ("--max-new-tokens", args.max_new_tokens is None or args.max_new_tokens > 0)):
        if not ok:
            p.error(f"{name} out of range: {getattr(args, name[2:].replace('-', '_'))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = finished_stage(args.dir)
        conversational = {"auto": trained_on_conversations(args.dir, summary), "chat": True,
                          "plain": False}[args.mode]
        if args.system and not conversational:
            raise ChatError("--system needs a model trained on conversations (or --mode chat); "
                            f"{args.dir} was trained on plain prompt→completion text")
        hf_logging.disable_progress_bar()  # a "Loading weights" bar would be the first thing the user sees
        model, tokenizer = load_causal_lm(str(args.dir), dtype=args.dtype)
    except (ChatError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    options = Options(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
        max_new_tokens=args.max_new_tokens or default_max_new_tokens(summary),
        prompt_format=args.prompt_format.replace("\\n", "\n").replace("\\t", "\t"), system=args.system,
    )
    interactive = sys.stdin.isatty()
    session = Session(model, tokenizer, conversational, options, stream=sys.stdout if sys.stdout.isatty() else None)
    set_seed(args.seed)
    _banner(args, summary, session)
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
            import readline  # noqa: F401
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() in ("/quit", "/exit"):
            return 0
        if not line.strip():
            continue
        if line.strip() == "/help":
            print(COMMANDS, file=sys.stderr)
            continue
        if line.strip() == "/reset":
            session.reset()
            print("(conversation reset)" if conversational else "(nothing to reset: this model answers each line "
                  "on its own)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}: {COMMANDS}", file=sys.stderr)
            continue
        try:
            reply = session.reply(line)
        except ChatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.show_prompt:
            print(f"prompt: {reply.prompt!r}", file=sys.stderr)
        if reply.dropped_turns:
            print(f"(the {reply.dropped_turns} earliest turns no longer fit the context and were left out)",
                  file=sys.stderr)
        if session.stream is None:
            print(reply.text, flush=True)
        if not reply.ended:
            print(f"(no EOS within {options.max_new_tokens} tokens: the reply was cut)", file=sys.stderr)


def _read_line(interactive: bool) -> str | None:
    """The next line without its newline; None at end of input (Ctrl-D, or the end of a piped script)."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def _banner(args: argparse.Namespace, summary: dict[str, Any], session: Session) -> None:
    o = session.options
    how = ("chat template, with history" if session.conversational
           else f"plain prompt→completion, each line on its own as {o.prompt_format.replace('{text}', '<line>')!r}")
    sampling = "greedy" if o.greedy else f"temperature {o.temperature}, top_k {o.top_k}, top_p {o.top_p}"
    print(f"{args.dir}: the {summary['stage']} policy; prompts: {how}; {sampling}, at most {o.max_new_tokens} "
          f"new tokens, seed {args.seed}. {COMMANDS}.", file=sys.stderr)
