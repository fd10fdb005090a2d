"""Data loading: every data format the pipeline reads, parsed and validated in one place.

## Sources

Every data key (`pretrain.data.train`, `sft.data.eval`, ...) takes a *source*:

- a local file: `.jsonl` (one JSON object per line), `.json` (a JSON list of objects, or JSON lines),
  `.parquet`, `.csv` (in a CSV, list-valued fields such as `completions`, `ranks` and `messages` hold
  JSON, e.g. `"[1, 2]"`), or `.txt` (corpora only: every non-empty line is one document);
- a local folder: every supported file directly inside it, in name order, concatenated;
- a hub data set `owner/name` or `owner/name:split` (default split `train`), read with
  `datasets.load_dataset(name, split=split)`.

- the name of an entry of the profile's data registry (`datasets:` in the profile, config.DatasetConfig):
  its path or hub id (with split, subset, data_dir), its kind, and a column map applied to every row
  before the row is checked (see "Column maps" below).

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
  between them), and a row where every completion is tied is an error. Instead of `ranks`, `scores`
  (one number per completion, higher is better; numeric strings are read as numbers) become dense
  ranks: [7.5, 9, 7.5, 2] -> [2, 1, 2, 3], equal scores tie. Each pair of differently ranked
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

## Column maps

A registry entry's `columns` (foreign name -> ours) turn a foreign row into one of the formats above:
- a rename: `{question: prompt, answer: completion}`, `{response_j: chosen, response_k: rejected}`;
  columns the map does not name keep their names;
- a join: several columns mapped to `prompt`, `completion` or `text` are joined in the map's order, a blank
  line apart, empty values left out (Alpaca: `{instruction: prompt, input: prompt, output: completion}`);
- a nested value: `a.b` is key `b` inside column `a`, taken from every element when `a` is a list
  (UltraFeedback: `{completions.response: completions, completions.overall_score: scores}`);
- turn keys: a column mapped to `role` or `content` renames that key inside every turn of `messages`
  (ShareGPT: `{conversations: messages, from: role, value: content}`); the roles `human` and `gpt` become
  `user` and `assistant`, and the entry's `roles` name others.
Errors then name the foreign field: `completions[2].overall_score`, `conversations[1].from`. A row that
matches no format (with or without a map) gets the columns found and, when common names suggest one that
reads the row, the map to write in the registry (`guess_columns`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets
import pyarrow.parquet as pq

from pipeline.config import DatasetConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Kind = Literal["corpus", "demonstrations", "rankings", "prompts"]
Row = dict[str, Any]

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
_CSV_JSON_FIELDS = ("messages", "completions", "ranks", "scores")
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
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # A byte offset means nothing in an editor: name the line (a .jsonl/.txt row) and the byte within it.
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text ({e.reason}: byte 0x{data[e.start]:02x} at byte {column} of the "
            "line); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old > new`)"
        ) from None


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


def _read_csv(path: Path, json_fields: tuple[str, ...]) -> Iterator[tuple[str, int, Any]]:
    # Decoded whole first: a decoding error met while streaming would name no line (and escape as a traceback).
    with io.StringIO(_read_text(path), newline="") as f:
        for i, row in enumerate(csv.DictReader(f), 1):
            row = {k: v for k, v in row.items() if k is not None and v is not None}
            for key in json_fields:
                if isinstance(row.get(key), str) and row[key].strip():
                    try:
                        row[key] = json.loads(row[key])
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{path}, row {i}, field '{key}': a list in a CSV cell must be JSON ({e.msg})"
                        ) from None
            yield str(path), i, row


def _read_file(path: Path, kind: Kind, json_fields: tuple[str, ...]) -> Iterator[tuple[str, int, Any]]:
    if path.suffix in (".jsonl", ".json"):
        yield from _read_json(path)
    elif path.suffix == ".csv":
        yield from _read_csv(path, json_fields)
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


def _read_hub(
    source: str, name: str, split: str, subset: str | None = None, data_dir: str | None = None
) -> Iterator[tuple[str, int, Any]]:
    try:
        options = {k: v for k, v in (("name", subset), ("data_dir", data_dir)) if v is not None}
        ds = datasets.load_dataset(name, split=split, **options)
    except Exception as e:
        raise DataError(f"{source}: file not found, and loading it as a hub data set failed: {e}") from e
    n = 0
    for batch in ds.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            n += 1
            yield source, n, dict(zip(columns, values, strict=True))


def _records(
    source: str, kind: Kind, entry: DatasetConfig | None = None, name: str = ""
) -> Iterator[tuple[str, int, Any]]:
    json_fields = _CSV_JSON_FIELDS
    if entry is not None:
        # In a CSV, the foreign columns that feed list-valued fields hold JSON too.
        lists = ("messages", "completions", "ranks", "scores")
        json_fields += tuple(src.split(".")[0] for src, ours in entry.columns.items() if ours in lists)
        if entry.hub is not None:
            yield from _read_hub(entry.location, entry.hub, entry.split or "train", entry.subset, entry.data_dir)
            return
        source = entry.path or source
    path = Path(source).expanduser()
    if path.is_dir():
        usable = SUFFIXES if kind == "corpus" else SUFFIXES[:-1]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in usable)
        if not files:
            raise DataError(f"{source}: folder has no {' / '.join(usable)} files")
        for file in files:
            yield from _read_file(file, kind, json_fields)
    elif path.is_file():
        yield from _read_file(path, kind, json_fields)
    elif entry is not None:
        raise DataError(f"{source}: file not found (datasets.{name}.path)")
    elif (m := _HUB_ID.match(source)) and not source.endswith(SUFFIXES):
        yield from _read_hub(source, m["name"], m["split"] or "train")
    else:
        where = "" if path.is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"
        raise DataError(f"{source}: file not found{where}")


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
    raise _FieldError(None, "expected 'prompt' and 'completion', or 'messages' (SFT demonstrations)")


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
    raise _FieldError(None, "expected 'prompt' or 'messages' (PPO prompts)")


def _ranking(row: Row) -> tuple[str, Row]:
    if _present(row, "completions") or _present(row, "ranks") or _present(row, "scores"):
        return "ranked", _ranked(row)
    if _present(row, "prompt") and (_present(row, "chosen") or _present(row, "rejected")):
        prompt = _string(row, "prompt", nonempty=False)
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    elif _present(row, "chosen") or _present(row, "rejected"):
        prompt, chosen, rejected = _split_hh(_string(row, "chosen"), _string(row, "rejected"))
    else:
        raise _FieldError(
            None,
            "expected 'prompt', 'completions' and 'ranks' (or 'scores'); or 'prompt', 'chosen' and 'rejected'; "
            "or hh-rlhf 'chosen' and 'rejected' dialogues (reward-model rankings)",
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
    if _present(row, "scores"):
        if _present(row, "ranks"):
            raise _FieldError("scores", "give 'ranks' or 'scores', not both")
        name, ranks = "scores", _ranks_from_scores(row["scores"], len(completions))
    else:
        name = "ranks"
        if ranks is None:  # e.g. a CSV without the column: say it is missing, not that it is null
            raise _FieldError("ranks", "missing")
        if not isinstance(ranks, list):
            raise _FieldError("ranks", f"must be a list of integers, got {_type(ranks)}")
        if len(ranks) != len(completions):
            raise _FieldError("ranks", f"has {len(ranks)} entries but 'completions' has {len(completions)}")
        for i, r in enumerate(ranks):
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise _FieldError(f"ranks[{i}]", f"must be an integer >= 1 (1 = best), got {r!r}")
    if len(set(ranks)) == 1:
        raise _FieldError(name, "all completions tied: no comparison")
    first: dict[str, int] = {}
    for i, c in enumerate(completions):
        j = first.setdefault(c, i)
        if ranks[j] != ranks[i]:
            raise _FieldError(f"completions[{i}]", f"is identical to completions[{j}] but ranked differently")
    return {"prompt": prompt, "completions": list(completions), "ranks": list(ranks)}


def _ranks_from_scores(scores: Any, n: int) -> list[int]:
    """Dense ranks from scores, higher is better: [7.5, 9, 7.5, 2] -> [2, 1, 2, 3]; equal scores tie."""
    if not isinstance(scores, list):
        raise _FieldError("scores", f"must be a list of numbers, got {_type(scores)}")
    if len(scores) != n:
        raise _FieldError("scores", f"has {len(scores)} entries but 'completions' has {n}")
    values = []
    for i, v in enumerate(scores):
        if isinstance(v, str):  # UltraFeedback's fine-grained ratings are strings such as "4" (or "N/A")
            try:
                v = float(v)
            except ValueError:
                raise _FieldError(f"scores[{i}]", f"must be a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            raise _FieldError(f"scores[{i}]", f"must be a number, got {v!r}")
        values.append(float(v))
    order = sorted(set(values), reverse=True)
    return [order.index(v) + 1 for v in values]


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


# ----------------------------------------------------------------------------------------------------
# Column maps: a registry entry's `columns` turn a foreign row into one of ours before it is checked, and
# the checks' field names are turned back into the foreign ones for the error message.

# ShareGPT's role names; a registry entry's `roles` adds to them.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
_TURN_KEYS = ("role", "content")
_ABSENT = object()
_FIELD_PATH = re.compile(r"^(?P<top>[^\[.]+)(?P<index>\[\d+\])?(?:\.(?P<sub>.+))?$")


class ColumnMap:
    """A registry entry's `columns` and `roles`, compiled (an empty map leaves rows as they are)."""

    def __init__(self, columns: dict[str, str], roles: dict[str, str] | None = None) -> None:
        self.columns = dict(columns)
        self.fields: dict[str, list[str]] = {}  # our row-level field -> the foreign columns (paths) feeding it
        self.turn_keys: dict[str, str] = {}  # foreign key inside a turn -> role / content
        for foreign, ours in columns.items():
            if ours in _TURN_KEYS:
                self.turn_keys[foreign] = ours
            else:
                self.fields.setdefault(ours, []).append(foreign)
        self.roles = {**SHAREGPT_ROLES, **(roles or {})} if roles is not None else {}

    def apply(self, raw: Row) -> Row:
        """The row with foreign columns renamed, nested ones extracted, joined ones joined."""
        if not self.columns and not self.roles:
            return raw
        consumed = {_top(raw, src) for sources in self.fields.values() for src in sources}
        row = {k: v for k, v in raw.items() if k not in consumed}
        for ours, sources in self.fields.items():
            values = [v for v in (_extract(raw, src) for src in sources) if v is not _ABSENT]
            if not values:
                row.pop(ours, None)  # absent: the check reports the foreign column missing
            elif len(sources) == 1 or not all(isinstance(v, str) for v in values):
                row[ours] = values[0] if len(sources) == 1 else next(v for v in values if not isinstance(v, str))
            else:  # Alpaca: instruction and input become one prompt, a blank line apart; an empty input drops out
                row[ours] = "\n\n".join(v for v in values if v.strip())
        turns = row.get("messages")
        if isinstance(turns, list) and (self.turn_keys or self.roles):
            row["messages"] = [self._turn(t) for t in turns]
        return row

    def _turn(self, turn: Any) -> Any:
        if not isinstance(turn, dict):
            return turn
        out = {self.turn_keys.get(k, k): v for k, v in turn.items()}
        role = out.get("role")
        if isinstance(role, str):
            out["role"] = self.roles.get(role, role)
        return out

    def foreign(self, field: str, raw: Row) -> str:
        """Our field path (`messages[2].role`, `scores[1]`) as the foreign one (`conversations[2].from`,
        `completions[1].overall_score`)."""
        m = _FIELD_PATH.match(field)
        if not m:
            return field
        top, index, sub = m["top"], m["index"] or "", m["sub"]
        sources = self.fields.get(top)
        if not sources:
            name = top + index
        elif len(sources) > 1:
            name = " + ".join(sources)
        else:
            src = sources[0]
            head, _, rest = src.partition(".")
            # `completions.response` feeding completions[i] reads back as completions[i].response
            name = f"{head}{index}.{rest}" if rest and src not in raw and index else src + index
        if sub:
            inverse = {ours: foreign for foreign, ours in self.turn_keys.items()}
            name += "." + inverse.get(sub, sub)
        return name


def _top(raw: Row, src: str) -> str:
    return src if src in raw else src.split(".")[0]


def _extract(raw: Row, src: str) -> Any:
    """The value at a foreign column path: `a` or `a.b` (b inside object a, or inside each element of list a)."""
    if src in raw:
        return raw[src]
    head, *rest = src.split(".")
    if head not in raw:
        return _ABSENT
    value = raw[head]
    for key in rest:
        if isinstance(value, list):
            value = [v.get(key) if isinstance(v, dict) else None for v in value]
        elif isinstance(value, dict):
            value = value.get(key)
        else:
            return None
    return value


# Common foreign names of our fields, most common first: the fix an error message suggests for an unmapped file.
_GUESSES: dict[str, tuple[str, ...]] = {
    "text": ("text", "content", "document", "body", "passage", "article"),
    "prompt": ("prompt", "question", "instruction", "query", "input", "context", "history"),
    "completion": ("completion", "answer", "response", "output", "target", "reply"),
    "messages": ("messages", "conversations", "conversation", "dialog", "dialogue", "chat", "turns"),
    "chosen": ("chosen", "response_j", "preferred", "better", "winner", "accepted", "chosen_response"),
    "rejected": ("rejected", "response_k", "dispreferred", "worse", "loser", "rejected_response"),
    "completions": ("completions", "responses", "answers", "candidates", "outputs", "generations"),
    "ranks": ("ranks", "ranking", "rank"),
    "scores": ("scores", "ratings", "rewards"),
}
_OUR_FIELDS = set(_GUESSES)
_GUESS_ITEM_TEXT = ("response", "text", "completion", "output", "content", "answer")
_GUESS_ITEM_SCORE = ("overall_score", "score", "rating", "reward")
_GUESS_TURN = {"role": ("role", "from", "speaker", "author"), "content": ("content", "value", "text", "message")}


def guess_columns(raw: Row, kind: str) -> dict[str, str]:
    """A column map (foreign -> ours) that the foreign row's names suggest for `kind`; {} when none does."""
    present = [k for k in raw if raw[k] is not None]

    def first(ours: str) -> str | None:
        return next((c for c in _GUESSES[ours] if c in present), None)

    out: dict[str, str] = {}

    def add(foreign: str | None, ours: str) -> None:
        if foreign is not None and foreign != ours:
            out[foreign] = ours

    def prompt() -> None:
        p = first("prompt")
        add(p, "prompt")
        if p == "instruction" and "input" in present:  # Alpaca: instruction and input together
            out["instruction"], out["input"] = "prompt", "prompt"

    def conversation(foreign: str) -> None:
        add(foreign, "messages")
        turns = raw[foreign]
        turn = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        for ours, names in _GUESS_TURN.items():
            add(next((n for n in names if n in turn), None), ours)

    if kind == "corpus":
        add(first("text"), "text")
    elif kind in ("demonstrations", "prompts"):
        if (m := first("messages")) is not None and isinstance(raw[m], list):
            conversation(m)
        else:
            prompt()
            if kind == "demonstrations":
                add(first("completion"), "completion")
    elif kind == "rankings":
        c = first("completions")
        if c is not None and isinstance(raw[c], list):
            prompt()
            items = raw[c]
            if items and all(isinstance(i, dict) for i in items):  # UltraFeedback: [{response, overall_score}, ...]
                text = next((k for k in _GUESS_ITEM_TEXT if k in items[0]), None)
                score = next((k for k in _GUESS_ITEM_SCORE if k in items[0]), None)
                if text:
                    out[f"{c}.{text}"] = "completions"
                if score:
                    out[f"{c}.{score}"] = "scores"
            else:
                add(c, "completions")
            if "ranks" not in present and (r := first("ranks")) is not None:
                add(r, "ranks")
            elif "ranks" not in present:
                add(first("scores"), "scores")
        elif first("chosen") is not None or first("rejected") is not None:
            if first("prompt") is not None:
                prompt()
            add(first("chosen"), "chosen")
            add(first("rejected"), "rejected")
    return out


def _yaml_map(columns: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in columns.items()) + "}"


_CHECKS: dict[str, Callable[[Row], tuple[str, Row]]] = {
    "corpus": _corpus,
    "demonstrations": _demonstration,
    "rankings": _ranking,
    "prompts": _prompt,
}


# ----------------------------------------------------------------------------------------------------
# Public API


def load(
    kind: Kind, source: str | DatasetConfig, skip_invalid: bool = False,
    registry: Mapping[str, DatasetConfig] | None = None,
) -> datasets.Dataset:
    """Read and validate every row of `source` as `kind`; return the normalized data set.

    `source` is a path or hub id, or the name of an entry of `registry` (the profile's `datasets:`), or an entry
    itself; an entry's column map is applied to every row before it is checked.
    The first invalid row raises DataError, unless `skip_invalid`: then invalid rows are dropped and counted.
    """
    label = _label(source, registry)
    rows: list[Row] = []
    skipped: list[str] = []
    for _, _, row in _valid_rows(kind, source, skip_invalid, registry, skipped):
        rows.append(row)
    if skipped:
        log.warning("%s: skipped %d of %d rows that fail validation (skip_invalid is on); the first: %s",
                    label, len(skipped), len(skipped) + len(rows), " | ".join(skipped[:3]))
    if not rows:
        why = f" (all {len(skipped)} rows invalid; the first: {skipped[0]})" if skipped else ""
        raise DataError(f"{label}: empty: no rows{why}")
    return datasets.Dataset.from_list(rows)


def row_origin(
    kind: Kind, source: str | DatasetConfig, index: int, skip_invalid: bool = False,
    registry: Mapping[str, DatasetConfig] | None = None,
) -> str:
    """`file, row n` of row `index` (0-based) of what `load` returns for the same arguments: for a problem found
    only once the rows meet the model (a prompt longer than its context), named like every other row error."""
    for i, (origin, n, _) in enumerate(_valid_rows(kind, source, skip_invalid, registry, [])):
        if i == index:
            return f"{origin}, row {n}"
    return f"{_label(source, registry)}, row #{index + 1}"


def _entry(source: str | DatasetConfig, registry: Mapping[str, DatasetConfig] | None) -> tuple[str, DatasetConfig | None]:
    """(registry name, entry) that `source` names, or ("", None) for a path or hub id."""
    if isinstance(source, str) and registry and source in registry:
        return source, registry[source]
    if not isinstance(source, str):
        return "<entry>", source
    return "", None


def _label(source: str | DatasetConfig, registry: Mapping[str, DatasetConfig] | None) -> str:
    entry = _entry(source, registry)[1]
    return entry.location if entry is not None else str(source)


def _valid_rows(
    kind: Kind, source: str | DatasetConfig, skip_invalid: bool, registry: Mapping[str, DatasetConfig] | None,
    skipped: list[str],
) -> Iterator[tuple[str, int, Row]]:
    """(origin, row number, normalized row) of every valid row; invalid ones raise, or with `skip_invalid` go to
    `skipped` (their messages)."""
    if kind not in _CHECKS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(_CHECKS)}")
    name, entry = _entry(source, registry)
    if entry is not None and entry.kind != kind:
        raise DataError(f"data set '{name}' holds {entry.kind} (datasets.{name}.kind), but {kind} are read here")
    label = _label(source, registry)
    ctx = _Context(kind, _CHECKS[kind], ColumnMap(entry.columns, entry.roles) if entry else ColumnMap({}), name)
    first: tuple[str, str, int] | None = None  # (format, origin, row) of the first valid row
    for origin, n, raw in _records(str(source) if entry is None else label, kind, entry, name):
        try:
            fmt, row = _check_row(ctx, origin, n, raw, first)
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
            continue
        first = first or (fmt, origin, n)
        yield origin, n, row


@dataclass(frozen=True)
class _Context:
    """How the rows of one source are checked: the kind, its check, the entry's column map and name."""

    kind: str
    check: Callable[[Row], tuple[str, Row]]
    columns: ColumnMap
    name: str  # the registry entry's name; "" for a plain path or hub id


def _check_row(ctx: _Context, origin: str, n: int, raw: Any, first: tuple[str, str, int] | None) -> tuple[str, Row]:
    """One row mapped, validated and normalized; DataError names the file, row and (foreign) field."""
    if not isinstance(raw, dict):
        hint = ""
        if isinstance(raw, list) and origin.endswith(".jsonl"):
            hint = "; a .jsonl file holds one JSON object per line (a JSON list of rows belongs in a .json file)"
        raise DataError(f"{origin}, row {n}: expected an object (one row of {ctx.kind}), got {_type(raw)}{hint}")
    try:
        fmt, row = ctx.check(ctx.columns.apply(raw))
    except _FieldError as e:
        field = f", field '{ctx.columns.foreign(e.field, raw)}'" if e.field else ""
        message = e.message
        if e.field is None or (e.message == "missing" and _FIELD_PATH.match(e.field) and "[" not in e.field):
            message += _shape_hint(ctx, raw)
        elif ctx.name and (m := re.fullmatch(r"messages\[(\d+)\]\.role", e.field)) and "must be one of" in message:
            role = ctx.columns.apply(raw)["messages"][int(m[1])]["role"]
            message += f"; say which it is in datasets.{ctx.name}.roles, e.g. {{{role}: assistant}}"
        raise DataError(f"{origin}, row {n}{field}: {message}") from None
    if first is not None and fmt != first[0]:
        field = "messages" if "messages" in row else next(iter(row))
        raise DataError(
            f"{origin}, row {n}, field '{field}': this row is {fmt} but {first[1]}, row {first[2]} is "
            f"{first[0]}; use one format per data set"
        )
    return fmt, row


def _shape_hint(ctx: _Context, raw: Row) -> str:
    """What a row that has none of the expected fields holds, and the column map that would read it."""
    hint = f"; found columns {_fields(raw)}"
    guess = guess_columns(raw, ctx.kind)
    if guess:
        try:
            ctx.check(ColumnMap(guess, {}).apply(raw))
        except _FieldError:
            guess = {}
    if not guess:
        if not set(raw) - _OUR_FIELDS:  # our own names, only a field short: nothing to map
            return hint
        where = f"datasets.{ctx.name}.columns" if ctx.name else "a registry entry's columns (datasets: in the profile)"
        return hint + f"; map the file's columns to these in {where}"
    if ctx.name:
        return hint + f"; map them in the registry: datasets.{ctx.name}.columns: {_yaml_map(guess)}"
    return hint + (
        f"; map them in the registry: columns: {_yaml_map(guess)} (declare the file under datasets: in the "
        "profile with its kind and these columns, and name that entry in the stage's data key)"
    )


def load_corpus(
    source: str, skip_invalid: bool = False, registry: Mapping[str, DatasetConfig] | None = None
) -> datasets.Dataset:
    """Pretraining text: column `text`."""
    return load("corpus", source, skip_invalid, registry)


def load_demonstrations(
    source: str, skip_invalid: bool = False, registry: Mapping[str, DatasetConfig] | None = None
) -> datasets.Dataset:
    """SFT data: columns `prompt`, `completion`, or column `messages` (the two TRL formats)."""
    return load("demonstrations", source, skip_invalid, registry)


def load_rankings(
    source: str, skip_invalid: bool = False, registry: Mapping[str, DatasetConfig] | None = None
) -> datasets.Dataset:
    """Reward-model data: columns `prompt` (str), `completions` (list[str]), `ranks` (list[int], 1 = best)."""
    return load("rankings", source, skip_invalid, registry)


def load_prompts(
    source: str, skip_invalid: bool = False, registry: Mapping[str, DatasetConfig] | None = None
) -> datasets.Dataset:
    """PPO prompts: column `prompt` (str) or column `messages` (ending in a non-assistant turn)."""
    return load("prompts", source, skip_invalid, registry)


def as_chat(rows: datasets.Dataset) -> datasets.Dataset:
    """Prompt and prompt-completion rows as conversations (config `chat_prompts`, for chat models): the prompt is
    one user turn and the completion the assistant's answer, so the chat template renders them as the model is
    chatted with. Rows that hold `messages` stay as they are; the order (and so every row number) is kept."""
    if "prompt" not in rows.column_names:
        return rows
    out = []
    for row in rows:
        if row.get("messages"):
            out.append({"messages": row["messages"]})
            continue
        turns = [{"role": "user", "content": row["prompt"]}]
        if row.get("completion") is not None:
            turns.append({"role": "assistant", "content": row["completion"]})
        out.append({"messages": turns})
    return datasets.Dataset.from_list(out)


def ranking_problem(row: Row) -> str | None:
    """Why a ranked row (`prompt`, `completions`, `ranks`) would fail `load_rankings`, as "field 'x': reason",
    or None: the labeling page checks a submission with the loader's own rules before writing it."""
    try:
        _ranked(row)
    except _FieldError as e:
        return f"field '{e.field}': {e.message}" if e.field else e.message
    return None


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
