"""The tiny toy task: a small instruction language, its gold reward, and the deterministic data generator.

A ~1M-parameter GPT-2 learns this language on a 2-core CPU in minutes, so the whole recipe (pretrain → SFT →
RM → PPO) can be run and checked against a ground truth that real data never has.

The language
------------
Every prompt is one line ending in "\\n"; N is a number word from two to six.

  kind     prompt                                  a perfect completion
  list     "list three colours\\n"                  "red, blue, green"   (any N distinct members, any order)
           "name three colours\\n"                  (same task, second phrasing)
  repeat   "repeat the word cat four times\\n"      "cat cat cat cat"
  count    "count to five\\n"                       "one two three four five"
           "count up to five\\n"                    (same task, second phrasing)

Categories (plural as in prompts): colours, animals, fruits, tools, vehicles, drinks, with 8-10 one-word
members each (see CATEGORIES). A repeat prompt's word is any category member or one of EXTRA_WORDS.
Completions carry no trailing newline and no EOS marker: the training stages append EOS.

The gold reward (the project's ground truth)
--------------------------------------------
gold_score(prompt, completion, ended) is in [0, 1]:

  1. words: the completion lowercased, every run of characters that are not letters or digits (commas,
     periods, spaces, newlines) treated as a separator: "Red,blue. green" -> [red, blue, green].
  2. correct, counted over head = the first N words only:
       list    the number of DISTINCT members of the prompt's category in head (a repeated member counts
               once, a member of another category or any other word counts 0);
       repeat  the number of words in head equal to the prompt's word;
       count   the number of positions i (1..N) where head's i-th word is the i-th number word (one, two, ...).
  3. accuracy = correct / N.
  4. clean ending: x EXTRA_WORDS_FACTOR (0.5) if the completion has more than N words (however many extra).
  5. EOS: x NO_EOS_FACTOR (0.5) if ended is False (the model did not emit EOS within its token budget).

  gold = accuracy x clean-ending factor x EOS factor, so a completion scores 1.0 exactly when it has N words,
  all correct, and ended. Examples for "list four animals\\n" (ended=True unless noted):
    "cat, dog, cow, pig" 1.0 | "cat, dog, cow" 0.75 | "cat, dog, cat, pig" 0.75 | "cat, dog, red, pig" 0.75 |
    "cat, dog, cow, pig, goat" 0.5 | "cat, dog, cow, pig" with ended=False 0.5 | "" 0.0.
  A prompt that is not a tiny-task prompt (parse_prompt fails) raises ValueError.

The data (generate(), CLI: python -m pipeline.tinytask --out data/tiny [--seed 0])
-----------------------------------------------------------------------------------
  corpus.{train,eval}.jsonl    {"text"}: short paragraphs of "world knowledge" in the toy language
                               (category membership, counting, repeated words, and the instruction vocabulary
                               "list", "name", "repeat", "the word", "times", "count to") that never contain a
                               prompt followed by its answer, so a pretrained-only model does not solve the task.
  demos.{train,eval}.jsonl     {"prompt", "completion"}: SFT demonstrations, ~75% perfect; the rest have one
                               trailing extra word (~10%), the last item missing (~10%) or one wrong item (~5%), so
                               SFT does not saturate the gold score and PPO has room (see shared/RECIPE.md).
  rankings.{train,eval}.jsonl  {"prompt", "completions": [4], "ranks": [4]}: K = 4 distinct candidates of mixed
                               quality (perfect, missing / extra / wrong / duplicated item, wrong content,
                               degenerate repetition, truncation, "a, b and c" joins); ranks are dense ranks by
                               gold (1 = best, equal gold -> equal rank); a row is never all tied.
  prompts.{train,eval}.jsonl   {"prompt"}: PPO prompts.

Train/eval split: the prompt space is small (60 list, 330 repeat, 10 count prompts), so it is split by exact
prompt string. Held out for eval: for 12 of the 30 (category, N) pairs one of the two list phrasings; for every
repeat word one N; for 3 of the 5 N one of the two count phrasings. Every held-out list and count task is still
trained under the other phrasing; a held-out repeat (word, N) is new, but its word (with other N) and its N are
trained. No eval prompt string appears in any train file. Each file draws its rows from random.Random(f"tinytask:{seed}:{name}"),
so the output is byte-identical for a given seed (rows are JSON with sorted keys, UTF-8, "\\n" line ends).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["list", "repeat", "count"]

NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
N_MIN, N_MAX = 2, 6
EXTRA_WORDS_FACTOR = 0.5  # completion has more than N words
NO_EOS_FACTOR = 0.5  # the model did not emit EOS


@dataclass(frozen=True)
class Category:
    plural: str  # as in prompts: "colours"
    singular: str  # as in the corpus: "colour"
    members: tuple[str, ...]


CATEGORIES: dict[str, Category] = {
    c.plural: c
    for c in (
        Category("colours", "colour", ("red", "blue", "green", "yellow", "black", "white", "pink", "brown",
                                       "purple", "grey")),
        Category("animals", "animal", ("cat", "dog", "horse", "cow", "pig", "sheep", "goat", "duck", "mouse",
                                       "lion")),
        Category("fruits", "fruit", ("apple", "pear", "banana", "grape", "plum", "cherry", "lemon", "mango",
                                     "peach", "melon")),
        Category("tools", "tool", ("hammer", "saw", "drill", "spade", "rake", "wrench", "axe", "chisel", "brush",
                                   "shovel")),
        Category("vehicles", "vehicle", ("car", "bus", "truck", "bike", "train", "boat", "plane", "van", "tram",
                                         "ship")),
        Category("drinks", "drink", ("water", "milk", "tea", "coffee", "juice", "soda", "cocoa", "lemonade")),
    )
}
EXTRA_WORDS: tuple[str, ...] = ("sun", "moon", "star", "tree", "book", "house", "ball", "hat")
REPEAT_WORDS: tuple[str, ...] = (*(m for c in CATEGORIES.values() for m in c.members), *EXTRA_WORDS)

LIST_VERBS: tuple[str, ...] = ("list", "name")
COUNT_PHRASES: tuple[str, ...] = ("count to", "count up to")

# Rows per generated file.
SIZES: dict[str, int] = {
    "corpus.train": 20000, "corpus.eval": 1000,
    "demos.train": 3000, "demos.eval": 300,
    "rankings.train": 3000, "rankings.eval": 300,
    "prompts.train": 1000, "prompts.eval": 200,
}  # fmt: skip
K = 4  # candidates per ranking row
DEMO_FLAWS: dict[str, float] = {"perfect": 0.75, "extra": 0.10, "missing": 0.10, "wrong_item": 0.05}


@dataclass(frozen=True)
class Task:
    """What a prompt asks for; phrasing variants of the same request parse to the same Task."""

    kind: Kind
    n: int
    category: str | None = None  # list: the plural category name ("colours")
    word: str | None = None  # repeat: the word to repeat


# ----------------------------------------------------------------------------------------------- prompts

_NUM = "|".join(NUMBERS[N_MIN - 1 : N_MAX])
_LIST_RE = re.compile(rf"(?:{'|'.join(LIST_VERBS)}) ({_NUM}) ({'|'.join(CATEGORIES)})")
_REPEAT_RE = re.compile(rf"repeat the word ([a-z]+) ({_NUM}) times")
_COUNT_RE = re.compile(rf"count (?:up )?to ({_NUM})")
_WORD_RE = re.compile(r"[^\W_]+")


def _n(word: str) -> int:
    return NUMBERS.index(word) + 1


def parse_prompt(prompt: str) -> Task:
    """The Task of a tiny-task prompt (case and surrounding/repeated whitespace ignored); ValueError otherwise."""
    text = " ".join(prompt.lower().split())
    if m := _LIST_RE.fullmatch(text):
        return Task("list", _n(m[1]), category=m[2])
    if (m := _REPEAT_RE.fullmatch(text)) and m[1] in REPEAT_WORDS:
        return Task("repeat", _n(m[2]), word=m[1])
    if m := _COUNT_RE.fullmatch(text):
        return Task("count", _n(m[1]))
    raise ValueError(f"not a tiny-task prompt: {prompt!r}")


def all_prompts() -> list[str]:
    """Every prompt string of the language, in a fixed order."""
    out = [f"{v} {NUMBERS[n - 1]} {c}\n" for c in CATEGORIES for n in range(N_MIN, N_MAX + 1) for v in LIST_VERBS]
    out += [f"repeat the word {w} {NUMBERS[n - 1]} times\n" for w in REPEAT_WORDS for n in range(N_MIN, N_MAX + 1)]
    out += [f"{p} {NUMBERS[n - 1]}\n" for n in range(N_MIN, N_MAX + 1) for p in COUNT_PHRASES]
    return out


def split_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval) prompt strings, disjoint; every task meaning stays trainable (see the module docstring)."""
    rng = random.Random(f"tinytask:{seed}:split")
    ns = list(range(N_MIN, N_MAX + 1))
    held: set[str] = set()
    pairs = [(c, n) for c in CATEGORIES for n in ns]
    for c, n in rng.sample(pairs, 12):
        held.add(f"{rng.choice(LIST_VERBS)} {NUMBERS[n - 1]} {c}\n")
    for w in REPEAT_WORDS:
        held.add(f"repeat the word {w} {NUMBERS[rng.choice(ns) - 1]} times\n")
    for n in sorted(rng.sample(ns, 3)):
        held.add(f"{rng.choice(COUNT_PHRASES)} {NUMBERS[n - 1]}\n")
    everything = all_prompts()
    return [p for p in everything if p not in held], [p for p in everything if p in held]


# ----------------------------------------------------------------------------------------------- gold


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def gold_score(prompt: str, completion: str, ended: bool = True) -> float:
    """Gold reward in [0, 1] for a completion of a tiny-task prompt.

    correct/N (list: distinct category members among the first N words; repeat: words equal to the target
    among the first N; count: positional matches with one, two, ...) x EXTRA_WORDS_FACTOR (0.5) if there are
    more than N words x NO_EOS_FACTOR (0.5) if not `ended` (no EOS). Case, punctuation/commas and whitespace
    are ignored. A prompt that is not a tiny-task prompt raises ValueError.
    """
    task = parse_prompt(prompt)
    words = _words(completion)
    head = words[: task.n]
    if task.kind == "list":
        members = CATEGORIES[task.category].members  # type: ignore[index]
        correct = len({w for w in head if w in members})
    elif task.kind == "repeat":
        correct = sum(w == task.word for w in head)
    else:
        correct = sum(w == NUMBERS[i] for i, w in enumerate(head))
    score = correct / task.n
    if len(words) > task.n:
        score *= EXTRA_WORDS_FACTOR
    if not ended:
        score *= NO_EOS_FACTOR
    return score


# ----------------------------------------------------------------------------------------------- completions


def _perfect(task: Task, rng: random.Random) -> list[str]:
    if task.kind == "list":
        return rng.sample(CATEGORIES[task.category].members, task.n)  # type: ignore[index]
    if task.kind == "repeat":
        return [task.word] * task.n  # type: ignore[list-item]
    return list(NUMBERS[: task.n])


def _join(task: Task, items: Sequence[str]) -> str:
    return (", " if task.kind == "list" else " ").join(items)


def _wrong_word(task: Task, i: int, rng: random.Random) -> str:
    """A word that is wrong at position i: another category's member, another word, another number."""
    if task.kind == "list":
        return rng.choice([m for c in CATEGORIES.values() if c.plural != task.category for m in c.members])
    if task.kind == "repeat":
        return rng.choice([w for w in REPEAT_WORDS if w != task.word])
    return rng.choice([x for x in NUMBERS[:8] if x != NUMBERS[i]])


def _extra_words(task: Task, items: list[str], k: int, rng: random.Random) -> list[str]:
    """k plausible trailing words: more members of the category, the word again, the next numbers."""
    if task.kind == "list":
        rest = [m for m in CATEGORIES[task.category].members if m not in items]  # type: ignore[index]
        return rng.sample(rest, min(k, len(rest))) or [items[0]]
    if task.kind == "repeat":
        return [task.word] * k  # type: ignore[list-item]
    return list(NUMBERS[len(items) : len(items) + k])


def _cand_perfect(task: Task, rng: random.Random) -> str:
    return _join(task, _perfect(task, rng))


def _cand_missing(task: Task, rng: random.Random, last: bool = False) -> str:
    """One item left out (anywhere, or the last one: a count that stops one short)."""
    items = _perfect(task, rng)
    del items[task.n - 1 if last else rng.randrange(task.n)]
    return _join(task, items)


def _cand_extra(task: Task, rng: random.Random, k: int | None = None) -> str:
    items = _perfect(task, rng)
    k = k or rng.choices((1, 2, 3), weights=(7, 2, 1))[0]
    return _join(task, items + _extra_words(task, items, k, rng))


def _cand_wrong_item(task: Task, rng: random.Random, k: int | None = None) -> str:
    items = _perfect(task, rng)
    k = k or rng.choices((1, 2), weights=(3, 1))[0]
    for i in rng.sample(range(task.n), min(k, task.n - 1)):
        items[i] = _wrong_word(task, i, rng)
    return _join(task, items)


def _cand_duplicate(task: Task, rng: random.Random) -> str:
    items = _perfect(task, rng)
    if task.kind == "list":  # one member listed twice in place of another: "red, blue, red"
        i, j = rng.sample(range(task.n), 2)
        items[j] = items[i]
    elif task.kind == "repeat":  # repeated too often
        items += [task.word] * rng.randint(1, task.n)  # type: ignore[list-item]
    else:  # a number said twice: "one two two four"
        j = rng.randrange(1, task.n)
        items[j] = items[j - 1]
    return _join(task, items)


def _cand_wrong_content(task: Task, rng: random.Random) -> str:
    if task.kind == "list":  # members of another category
        other = rng.choice([c for c in CATEGORIES.values() if c.plural != task.category and len(c.members) >= task.n])
        return _join(task, rng.sample(other.members, task.n))
    if task.kind == "repeat":  # another word
        return _join(task, [rng.choice([w for w in REPEAT_WORDS if w != task.word])] * task.n)
    if rng.random() < 0.5:  # counting down
        return _join(task, list(reversed(NUMBERS[: task.n])))
    start = rng.randint(2, 4)  # counting from the wrong start
    return _join(task, list(NUMBERS[start - 1 : start - 1 + task.n]))


def _cand_degenerate(task: Task, rng: random.Random) -> str:
    if task.kind == "repeat":  # the word once
        return task.word  # type: ignore[return-value]
    first = _perfect(task, rng)[0]  # one item over and over: "red, red, red"
    return _join(task, [first] * task.n)


def _cand_short(task: Task, rng: random.Random) -> str:
    return _join(task, _perfect(task, rng)[: rng.randint(1, max(1, task.n - 2))])


def _cand_and_join(task: Task, rng: random.Random) -> str:
    items = _perfect(task, rng)
    if task.kind != "list":
        return _join(task, [*items[:-1], "and", items[-1]])
    return f"{', '.join(items[:-1])} and {items[-1]}"


Candidate = Callable[[Task, random.Random], str]
CANDIDATES: dict[str, tuple[Candidate, float]] = {
    "perfect": (_cand_perfect, 3.0),
    "missing": (_cand_missing, 2.0),
    "extra": (_cand_extra, 2.0),
    "wrong_item": (_cand_wrong_item, 2.0),
    "duplicate": (_cand_duplicate, 2.0),
    "wrong_content": (_cand_wrong_content, 2.0),
    "degenerate": (_cand_degenerate, 1.0),
    "short": (_cand_short, 1.0),
    "and_join": (_cand_and_join, 1.0),
}


def demonstration(task: Task, rng: random.Random) -> str:
    """An SFT completion: perfect with probability DEMO_FLAWS["perfect"], else one small flaw (gold >= 0.5)."""
    flaw = rng.choices(list(DEMO_FLAWS), weights=list(DEMO_FLAWS.values()))[0]
    if flaw == "extra":
        return _cand_extra(task, rng, k=1)
    if flaw == "missing":  # the last item, so a count demo stays a count: gold (N-1)/N
        return _cand_missing(task, rng, last=True)
    if flaw == "wrong_item":
        return _cand_wrong_item(task, rng, k=1)
    return CANDIDATES[flaw][0](task, rng)


def dense_ranks(scores: Sequence[float]) -> list[int]:
    """Dense ranks, 1 = highest score, equal scores share a rank: [1.0, 0.5, 0.5, 0.0] -> [1, 2, 2, 3]."""
    keys = [round(s, 9) for s in scores]
    order = sorted(set(keys), reverse=True)
    return [order.index(k) + 1 for k in keys]


def ranking(prompt: str, rng: random.Random, k: int = K) -> dict:
    """A reward-model row: k distinct candidates of mixed quality and their dense ranks by gold score."""
    task = parse_prompt(prompt)
    names = list(CANDIDATES)
    weights = [CANDIDATES[n][1] for n in names]
    while True:
        kinds = rng.choices(names, weights=weights, k=k)
        if rng.random() < 0.85 and "perfect" not in kinds:
            kinds[0] = "perfect"
        completions: list[str] = []
        for kind in kinds:
            for _ in range(20):
                c = CANDIDATES[kind][0](task, rng)
                if c not in completions:
                    break
                kind = rng.choices(names, weights=weights)[0]
            if c not in completions:
                completions.append(c)
        if len(completions) < k:
            continue
        golds = [gold_score(prompt, c) for c in completions]
        if len(set(dense_ranks(golds))) > 1:
            order = list(range(k))
            rng.shuffle(order)
            completions = [completions[i] for i in order]
            return {"prompt": prompt, "completions": completions, "ranks": dense_ranks([golds[i] for i in order])}


# ----------------------------------------------------------------------------------------------- corpus


def _art(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _sent_category(rng: random.Random) -> str:
    c = rng.choice(list(CATEGORIES.values()))
    other = rng.choice([o for o in CATEGORIES.values() if o is not c])
    m = rng.choice(c.members)
    k = rng.randint(2, 5)
    ms = rng.sample(c.members, k)
    templates = [
        lambda: f"{m} is {_art(c.singular)}.",
        lambda: f"{m} is not {_art(other.singular)}.",
        lambda: f"some {c.plural} are {_and(ms)}.",
        lambda: f"{ms[0]} and {ms[1]} are {c.plural}.",
        lambda: f"there are {NUMBERS[k - 1]} {c.plural} here: {_and(ms)}.",
        lambda: f"a list of {c.plural}: {_and(ms)}.",
        lambda: f"{m} is the name of {_art(c.singular)}.",
        lambda: f"{m} and {rng.choice(other.members)} are not both {c.plural}.",
    ]
    return rng.choice(templates)()


def _sent_count(rng: random.Random) -> str:
    k = rng.randint(2, 10)
    seq = list(NUMBERS[:k])
    a = rng.randrange(9)
    templates = [
        lambda: f"{' '.join(seq)}.",
        lambda: f"{', '.join(seq)}.",
        lambda: f"she can count to {NUMBERS[k - 1]} with her fingers.",
        lambda: f"to count to {NUMBERS[k - 1]}, say {_and(seq)}.",
        lambda: f"after {NUMBERS[a]} comes {NUMBERS[a + 1]}.",
        lambda: f"{NUMBERS[a + 1]} is more than {NUMBERS[a]}.",
        lambda: f"we count {_and(seq)}: that is {NUMBERS[k - 1]} numbers.",
    ]
    return rng.choice(templates)()


def _sent_repeat(rng: random.Random) -> str:
    w = rng.choice(REPEAT_WORDS)
    k = rng.randint(2, 6)
    said = " ".join([w] * k)
    templates = [
        lambda: f"{said} is the word {w} {NUMBERS[k - 1]} times.",
        lambda: f"he said {said}, the word {w} {NUMBERS[k - 1]} times.",
        lambda: f"to repeat a word is to say it again: {w} {w}.",
        lambda: f"{w} is a word.",
        lambda: f"she says the word {w} again and again.",
        lambda: f"the dog jumps {NUMBERS[k - 1]} times.",
    ]
    return rng.choice(templates)()


def _sent_vocab(rng: random.Random) -> str:
    c = rng.choice(list(CATEGORIES.values()))
    k = rng.randint(2, 6)
    templates = [
        "a list has items.",
        f"this list has {NUMBERS[k - 1]} {c.plural} in it.",
        "please repeat after me.",
        "to repeat is to say again.",
        f"every {c.singular} has a name.",
        f"you can name many {c.plural}.",
        "a word can be said many times.",
        f"we can count the {c.plural}.",
    ]
    return rng.choice(templates)


_SENTENCES: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_sent_category, 0.45), (_sent_count, 0.2), (_sent_repeat, 0.2), (_sent_vocab, 0.15),
)  # fmt: skip


def paragraph(rng: random.Random) -> str:
    """A corpus row: 3-4 sentences of world knowledge, never a prompt followed by its answer."""
    fns, weights = zip(*_SENTENCES, strict=True)
    return " ".join(rng.choices(fns, weights=weights)[0](rng) for _ in range(rng.randint(3, 4)))


# ----------------------------------------------------------------------------------------------- files


def _sample_prompts(pool: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """n prompts drawn with replacement, the three kinds equally often."""
    by_kind: dict[str, list[str]] = {}
    for p in pool:
        by_kind.setdefault(parse_prompt(p).kind, []).append(p)
    kinds = sorted(by_kind)
    return [rng.choice(by_kind[rng.choice(kinds)]) for _ in range(n)]


def build_rows(name: str, seed: int = 0, n: int | None = None) -> list[dict]:
    """The rows of one file ("demos.train", ...), from its own random stream."""
    kind, split = name.split(".")
    n = SIZES[name] if n is None else n
    rng = random.Random(f"tinytask:{seed}:{name}")
    train_prompts, eval_prompts = split_prompts(seed)
    pool = train_prompts if split == "train" else eval_prompts
    if kind == "corpus":
        return [{"text": paragraph(rng)} for _ in range(n)]
    prompts = _sample_prompts(pool, n, rng)
    if kind == "demos":
        return [{"prompt": p, "completion": demonstration(parse_prompt(p), rng)} for p in prompts]
    if kind == "rankings":
        return [ranking(p, rng) for p in prompts]
    if kind == "prompts":
        return [{"prompt": p} for p in prompts]
    raise ValueError(f"unknown file {name!r}")


def generate(out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write every data file as out_dir/<name>.jsonl; return the row count per file name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name in SIZES:
        rows = build_rows(name, seed)
        text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
        (out_dir / f"{name}.jsonl").write_text(text, encoding="utf-8", newline="\n")
        counts[f"{name}.jsonl"] = len(rows)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the tiny toy task's data files.")
    parser.add_argument("--out", type=Path, default=Path("data/tiny"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    args = parser.parse_args(argv)
    counts = generate(args.out, args.seed)
    for name, rows in counts.items():
        path = args.out / name
        print(f"wrote {path} ({rows} rows, {path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
