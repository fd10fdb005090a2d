"""Data loading: every data format the pipeline reads, parsed and validated in one place.

## Sources

Every data key (`pretrain.data.train`, `sft.data.eval`, ...) takes a *source*:

- a local file: `.jsonl` (one JSON object per line), `.json` (a JSON list of objects, or JSON lines),
  `.parquet`, `.csv` (in a CSV, list-valued fields such as `completions`, `ranks` and `messages` hold
  JSON, e.g. `"[1, 2]"`), or `.txt` (corpora only: every non-empty line is one document);
- a local folder: every supported file directly inside it, in name order, concatenated;
- a hub data set `owner/name` or `owner/name:split` (default split `train`), read with
  `datasets.load_dataset(name, split=split)`.

Columns a kind does not use are ignored, so hub data sets with extra columns load as they are.
Every row is checked before any training starts; the first bad row stops the run with one message that
names the file, the row (1-based; in `.jsonl` and `.txt` files the line number, in a `.csv` the data row
after the header) and the field:

    data/x.jsonl, row 7, field 'ranks': has 3 entries but 'completions' has 4

Real data sets sometimes carry a few rows like that (a pair whose chosen and rejected replies are the
same, an empty reply). With `skip_invalid=True` (config key `<stage>.data.skip_invalid`) such rows are
dropped instead: the count and the first reasons are logged, and a source with no valid row is still an
error. Unreadable files stay errors either way.

## The four kinds

**corpus** (continued pretraining): `{"text": "..."}` with non-empty text, or a `.txt` file.

**demonstrations** (SFT), either TRL format, one per data set:
- prompt-completion: `{"prompt": "...", "completion": "..."}`; the prompt may be empty, the completion
  may not. The loss is on the completion only.
- conversational: `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` with
  at least one assistant turn with non-empty content. The loss is on the assistant turns.

**rankings** (reward model), all normalized to `prompt: str, completions: list[str], ranks: list[int]`:
- ranked: `{"prompt": "...", "completions": ["...", ...], "ranks": [2, 1, ...]}`: K >= 2 non-empty
  completions and one rank per completion; rank 1 is the best, equal ranks are ties (no comparison
  between them), and a row where every completion is tied is an error. Each pair of differently ranked
  completions is one comparison for the reward model (InstructGPT's K-choose-2 pairs).
- pairwise (TRL preference format): `{"prompt": "...", "chosen": "...", "rejected": "..."}`, read as
  completions `[chosen, rejected]` with ranks `[1, 2]`.
- Anthropic hh-rlhf: `{"chosen": dialogue, "rejected": dialogue}` with no prompt field, each dialogue
  like `"\\n\\nHuman: hi\\n\\nAssistant: hello"`. The prompt is the shared dialogue up to and including the
  last `"\\n\\nAssistant:"`, the completions are what follows it (e.g. `" hello"`).

  Identical chosen and rejected completions are an error: they carry no preference.

**prompts** (PPO): `{"prompt": "..."}` (non-empty), or `{"messages": [...]}` whose last turn is not an
assistant turn (the policy writes the next assistant turn). Rows of the other kinds load as prompts too:
only `prompt` (or `messages`) is read.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Kind = Literal["corpus", "demonstrations", "rankings", "prompts"]
Row = dict[str, Any]

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
_CSV_JSON_FIELDS = ("messages", "completions", "ranks")
_HUB_ID = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<split>[^:]+))?$")


class DataError(ValueError):
    """A data source that cannot be used, with the file (or hub name), row and field at fault."""


class _FieldError(Exception):
    """Raised by the row checks; the loader adds the source and row number."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# ----------------------------------------------------------------------------------------------------
# Reading: a source becomes (origin, row number, raw row) triples.


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, int, Any]]:
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may contain raw
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield str(path), lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, row {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, int, Any]]:
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        for i, row in enumerate(rows, 1):
            yield str(path), i, row
    else:
        yield from _json_lines(path, text)


def _read_csv(path: Path) -> Iterator[tuple[str, int, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.DictReader(f), 1):
            row = {k: v for k, v in row.items() if k is not None and v is not None}
            for key in _CSV_JSON_FIELDS:
                if isinstance(row.get(key), str) and row[key].strip():
                    try:
                        row[key] = json.loads(row[key])
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{path}, row {i}, field '{key}': a list in a CSV cell must be JSON ({e.msg})"
                        ) from None
            yield str(path), i, row


def _read_file(path: Path, kind: Kind) -> Iterator[tuple[str, int, Any]]:
    if path.suffix in (".jsonl", ".json"):
        yield from _read_json(path)
    elif path.suffix == ".csv":
        yield from _read_csv(path)
    elif path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: unreadable parquet file ({e})") from None
        for i, row in enumerate(rows, 1):
            yield str(path), i, row
    elif path.suffix == ".txt" and kind == "corpus":
        for lineno, line in enumerate(_read_text(path).split("\n"), 1):
            if line.strip():
                yield str(path), lineno, {"text": line.rstrip("\r")}
    elif path.suffix == ".txt":
        raise DataError(f"{path}: .txt files hold corpora only; {kind} need .jsonl, .json, .parquet or .csv")
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use one of {', '.join(SUFFIXES)})")


def _read_hub(source: str, name: str, split: str) -> Iterator[tuple[str, int, Any]]:
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{source}: file not found, and loading it as a hub data set failed: {e}") from e
    n = 0
    for batch in ds.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            n += 1
            yield source, n, dict(zip(columns, values, strict=True))


def _records(source: str, kind: Kind) -> Iterator[tuple[str, int, Any]]:
    path = Path(source).expanduser()
    if path.is_dir():
        usable = SUFFIXES if kind == "corpus" else SUFFIXES[:-1]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in usable)
        if not files:
            raise DataError(f"{source}: folder has no {' / '.join(usable)} files")
        for file in files:
            yield from _read_file(file, kind)
    elif path.is_file():
        yield from _read_file(path, kind)
    elif (m := _HUB_ID.match(source)) and not source.endswith(SUFFIXES):
        yield from _read_hub(source, m["name"], m["split"] or "train")
    else:
        raise DataError(f"{source}: file not found")


# ----------------------------------------------------------------------------------------------------
# Row checks: each returns (format name, normalized row) or raises _FieldError.


def _present(row: Row, key: str) -> bool:
    return row.get(key) is not None


def _string(row: Row, key: str, *, nonempty: bool = True) -> str:
    if not _present(row, key):
        raise _FieldError(key, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise _FieldError(key, f"must be a string, got {_type(value)}")
    if nonempty and not value.strip():
        raise _FieldError(key, "is empty")
    return value


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _messages(row: Row) -> list[Row]:
    turns = row["messages"]
    if not isinstance(turns, list):
        raise _FieldError("messages", f"must be a list of turns, got {_type(turns)}")
    if not turns:
        raise _FieldError("messages", "is empty")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _FieldError(
                f"messages[{i}]", f"must be an object with 'role' and 'content', got {_type(turn)}"
            )
        for key in ("role", "content"):
            if turn.get(key) is None:
                raise _FieldError(f"messages[{i}].{key}", "missing")
        if turn["role"] not in ROLES:
            raise _FieldError(
                f"messages[{i}].role", f"must be one of {', '.join(ROLES)}; got {turn['role']!r}"
            )
        if not isinstance(turn["content"], str):
            raise _FieldError(f"messages[{i}].content", f"must be a string, got {_type(turn['content'])}")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def _corpus(row: Row) -> tuple[str, Row]:
    return "text", {"text": _string(row, "text")}


def _demonstration(row: Row) -> tuple[str, Row]:
    if _present(row, "messages"):
        turns = _messages(row)
        if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
            raise _FieldError("messages", "has no assistant turn with non-empty content to train on")
        return "conversational (messages)", {"messages": turns}
    if _present(row, "prompt") or _present(row, "completion"):
        prompt = _string(row, "prompt", nonempty=False)
        return "prompt-completion", {"prompt": prompt, "completion": _string(row, "completion")}
    raise _FieldError(None, f"expected 'prompt' and 'completion', or 'messages'; found {_fields(row)}")


def _prompt(row: Row) -> tuple[str, Row]:
    if _present(row, "messages"):
        turns = _messages(row)
        if turns[-1]["role"] == "assistant":
            raise _FieldError(
                f"messages[{len(turns) - 1}].role", "a prompt must not end with an assistant turn"
            )
        return "conversational (messages)", {"messages": turns}
    if _present(row, "prompt"):
        return "prompt", {"prompt": _string(row, "prompt")}
    raise _FieldError(None, f"expected 'prompt' or 'messages'; found {_fields(row)}")


def _ranking(row: Row) -> tuple[str, Row]:
    if _present(row, "completions") or _present(row, "ranks"):
        return "ranked", _ranked(row)
    if _present(row, "prompt") and (_present(row, "chosen") or _present(row, "rejected")):
        prompt = _string(row, "prompt", nonempty=False)
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    elif _present(row, "chosen") or _present(row, "rejected"):
        prompt, chosen, rejected = _split_hh(_string(row, "chosen"), _string(row, "rejected"))
    else:
        raise _FieldError(
            None,
            "expected 'prompt', 'completions' and 'ranks'; or 'prompt', 'chosen' and 'rejected'; "
            f"or hh-rlhf 'chosen' and 'rejected' dialogues; found {_fields(row)}",
        )
    if chosen == rejected:
        raise _FieldError("rejected", "is identical to 'chosen': no comparison")
    return "ranked", {"prompt": prompt, "completions": [chosen, rejected], "ranks": [1, 2]}


def _ranked(row: Row) -> Row:
    prompt = _string(row, "prompt", nonempty=False)
    completions, ranks = row.get("completions"), row.get("ranks")
    if not isinstance(completions, list):
        raise _FieldError("completions", f"must be a list of strings, got {_type(completions)}")
    if len(completions) < 2:
        raise _FieldError("completions", f"needs at least 2 completions to compare, got {len(completions)}")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise _FieldError(f"completions[{i}]", f"must be a string, got {_type(c)}")
        if not c.strip():
            raise _FieldError(f"completions[{i}]", "is empty")
    if not isinstance(ranks, list):
        raise _FieldError("ranks", f"must be a list of integers, got {_type(ranks)}")
    if len(ranks) != len(completions):
        raise _FieldError("ranks", f"has {len(ranks)} entries but 'completions' has {len(completions)}")
    for i, r in enumerate(ranks):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise _FieldError(f"ranks[{i}]", f"must be an integer >= 1 (1 = best), got {r!r}")
    if len(set(ranks)) == 1:
        raise _FieldError("ranks", "all completions tied: no comparison")
    first: dict[str, int] = {}
    for i, c in enumerate(completions):
        j = first.setdefault(c, i)
        if ranks[j] != ranks[i]:
            raise _FieldError(f"completions[{i}]", f"is identical to completions[{j}] but ranked differently")
    return {"prompt": prompt, "completions": list(completions), "ranks": list(ranks)}


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf: (shared prompt up to and including the last '\\n\\nAssistant:', chosen, rejected)."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _FieldError(
            "chosen", "has no '\\n\\nAssistant:' turn (hh-rlhf dialogue format) and no 'prompt'"
        )
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if rejected.rfind(HH_ASSISTANT) != cut or not rejected.startswith(prompt):
        raise _FieldError(
            "rejected",
            "does not share the dialogue of 'chosen' up to its last '\\n\\nAssistant:' (hh-rlhf format)",
        )
    completions = chosen[len(prompt) :], rejected[len(prompt) :]
    for key, completion in zip(("chosen", "rejected"), completions, strict=True):
        if not completion.strip():
            raise _FieldError(key, "has an empty final assistant response")
    return prompt, *completions


def _fields(row: Row) -> str:
    keys = [k for k in row if _present(row, k)]
    return ", ".join(f"'{k}'" for k in keys) if keys else "no fields"


_CHECKS: dict[str, Callable[[Row], tuple[str, Row]]] = {
    "corpus": _corpus,
    "demonstrations": _demonstration,
    "rankings": _ranking,
    "prompts": _prompt,
}


# ----------------------------------------------------------------------------------------------------
# Public API


def load(kind: Kind, source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """Read and validate every row of `source` as `kind`; return the normalized data set.

    The first invalid row raises DataError, unless `skip_invalid`: then invalid rows are dropped and counted.
    """
    if kind not in _CHECKS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(_CHECKS)}")
    check = _CHECKS[kind]
    rows: list[Row] = []
    skipped: list[str] = []
    first: tuple[str, str, int] | None = None  # (format, origin, row) of the first valid row
    for origin, n, raw in _records(source, kind):
        try:
            fmt, row = _check_row(check, kind, origin, n, raw, first)
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
            continue
        first = first or (fmt, origin, n)
        rows.append(row)
    if skipped:
        log.warning("%s: skipped %d of %d rows that fail validation (skip_invalid is on); the first: %s",
                    source, len(skipped), len(skipped) + len(rows), " | ".join(skipped[:3]))
    if not rows:
        why = f" (all {len(skipped)} rows invalid; the first: {skipped[0]})" if skipped else ""
        raise DataError(f"{source}: empty: no rows{why}")
    return datasets.Dataset.from_list(rows)


def _check_row(
    check: Callable[[Row], tuple[str, Row]], kind: str, origin: str, n: int, raw: Any,
    first: tuple[str, str, int] | None,
) -> tuple[str, Row]:
    """One row validated and normalized; DataError names the file, row and field."""
    if not isinstance(raw, dict):
        raise DataError(f"{origin}, row {n}: expected an object (one row of {kind}), got {_type(raw)}")
    try:
        fmt, row = check(raw)
    except _FieldError as e:
        field = f", field '{e.field}'" if e.field else ""
        raise DataError(f"{origin}, row {n}{field}: {e.message}") from None
    if first is not None and fmt != first[0]:
        field = "messages" if "messages" in row else next(iter(row))
        raise DataError(
            f"{origin}, row {n}, field '{field}': this row is {fmt} but {first[1]}, row {first[2]} is "
            f"{first[0]}; use one format per data set"
        )
    return fmt, row


def load_corpus(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """Pretraining text: column `text`."""
    return load("corpus", source, skip_invalid)


def load_demonstrations(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """SFT data: columns `prompt`, `completion`, or column `messages` (the two TRL formats)."""
    return load("demonstrations", source, skip_invalid)


def load_rankings(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """Reward-model data: columns `prompt` (str), `completions` (list[str]), `ranks` (list[int], 1 = best)."""
    return load("rankings", source, skip_invalid)


def load_prompts(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """PPO prompts: column `prompt` (str) or column `messages` (ending in a non-assistant turn)."""
    return load("prompts", source, skip_invalid)


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """Every (winner index, loser index) with ranks[winner] < ranks[loser]; tied completions give no pair."""
    return [(w, lo) for w in range(len(ranks)) for lo in range(len(ranks)) if ranks[w] < ranks[lo]]


def pack_corpus(
    corpus: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, key: str = "pretrain.block_size"
) -> datasets.Dataset:
    """Tokenize every document, end it with EOS, concatenate, and cut into `block_size`-token blocks.

    The trailing remainder shorter than a block is dropped (as in transformers' run_clm). Labels equal the
    inputs: the model shifts them internally.
    """
    return pack_tokenized(tokenize_corpus(corpus, tokenizer), block_size, key)


def tokenize_corpus(corpus: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Column `ids`: every document's tokens followed by EOS (the first half of `pack_corpus`)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [[*x, eos] for x in ids]}

    return corpus.map(tokenize, batched=True, remove_columns=corpus.column_names, desc="Tokenizing corpus")


def pack_tokenized(tokenized: datasets.Dataset, block_size: int, key: str = "pretrain.block_size") -> datasets.Dataset:
    """Concatenate `tokenize_corpus`'s documents and cut them into blocks (the second half of `pack_corpus`).

    Documents are grouped 1000 at a time, so each group's remainder shorter than a block is dropped.
    """

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = list(itertools.chain.from_iterable(batch["ids"]))
        n = (len(flat) // block_size) * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    packed = tokenized.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc="Packing blocks")
    if len(packed) == 0:
        raise DataError(
            f"the corpus has fewer than {key}={block_size} tokens: nothing to train on"
        )
    return packed
