"""Ranking the policy's own samples: the to-label file, the simulated (gold) labeler, durable appends, merging.

## Files

`to_label.jsonl` (written by `python -m pipeline label`), one item per prompt:

    {"id": "00007-3f9a0c1e", "prompt": "...", "completions": ["...", ...], "ended": [true, false, ...],
     "gold": [1.0, 0.25, ...]}

`ended` says whether the policy emitted EOS (a completion cut at the token budget is shown as cut off);
`gold` is there only when the profile has a gold reward. The id is the item's place in the file and a hash of
its text, so a rankings row never matches an item of a different to-label file.

`rankings.jsonl`: the reward model's ranked format (`prompt`, `completions`, `ranks`, 1 = best, equal ranks are
ties) plus `id`, `labeler` and, from the page, `flag` (a labeler's free-text note) and `time`. `make rm` reads
it unchanged: pipeline/data.py ignores the extra fields.

## The gold labeler and what `label.noise` means

Gold scores no further apart than `label.tie_threshold` (chained over the sorted scores) form one tie group;
a row with a single group carries no comparison and is dropped (counted in the summary). With noise 0 the
groups are ranked by gold score. With noise p > 0 the labeler is a Thurstone (1927) model of a person: each
group's gold score gets independent Gaussian noise of standard deviation σ and the groups are ranked by the
noisy scores, so a pair of groups a gold gap Δ apart is flipped with probability ½·erfc(Δ / 2σ): close pairs
flip more often than distant ones, as with people, and the ranking stays consistent (no cycles). σ is solved
per row so that the expected fraction of the row's comparisons (pairs of completions in different groups)
that are flipped is exactly p; hence over any set of rows the expected flip rate against the gold order is p,
which the stage measures and reports (`flip_rate`). p = 0.5 ranks the groups uniformly at random.
InstructGPT's labelers agreed with each other ~73 % of the time: `label.noise=0.27`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data import DataError, ranking_problem

# --------------------------------------------------------------------------------------------- to-label file


def item_id(index: int, prompt: str, completions: Sequence[str]) -> str:
    digest = hashlib.sha1(json.dumps([prompt, list(completions)]).encode()).hexdigest()[:8]
    return f"{index:05d}-{digest}"


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-empty line; a bad line is a DataError naming file and row."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, row {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return out


def read_to_label(path: Path) -> list[dict[str, Any]]:
    """The items of a to-label file, checked: an id, a prompt, K >= 2 non-empty distinct completions."""
    items: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}, row {lineno}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object (one item to label)")
        for key, tp in (("id", str), ("prompt", str), ("completions", list)):
            if not isinstance(row.get(key), tp):
                raise DataError(f"{where}, field '{key}': missing or not a {tp.__name__}")
        comps = row["completions"]
        if len(comps) < 2 or not all(isinstance(c, str) and c.strip() for c in comps):
            raise DataError(f"{where}, field 'completions': needs at least 2 non-empty strings")
        if len(set(comps)) != len(comps):
            raise DataError(f"{where}, field 'completions': has duplicates (a duplicate carries no comparison)")
        ended = row.get("ended", [True] * len(comps))
        if not isinstance(ended, list) or len(ended) != len(comps):
            raise DataError(f"{where}, field 'ended': needs one true/false per completion")
        if row["id"] in seen:
            raise DataError(f"{where}, field 'id': {row['id']!r} is also the id of row {seen[row['id']]}")
        seen[row["id"]] = lineno
        items.append({**row, "ended": [bool(e) for e in ended]})
    if not items:
        raise DataError(f"{path}: empty: no items to label")
    return items


# --------------------------------------------------------------------------------------------- gold labeler


def tie_groups(scores: Sequence[float], threshold: float) -> list[int]:
    """Group index per score (0 = best); sorted scores no further apart than `threshold` share a group."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    groups = [0] * len(scores)
    g = 0
    for prev, i in itertools.pairwise(order):
        if scores[prev] - scores[i] > threshold + 1e-12:  # 1e-12: float noise in equal gold scores
            g += 1
        groups[i] = g
    return groups


def _mean_flip(gaps: Sequence[tuple[float, int]], sigma: float) -> float:
    """Expected fraction of flipped comparisons: pairs of groups `gap` apart, `weight` comparisons each."""
    total = sum(w for _, w in gaps)
    return sum(w * 0.5 * math.erfc(gap / (2 * sigma)) for gap, w in gaps) / total


def calibrate_sigma(gaps: Sequence[tuple[float, int]], noise: float) -> float:
    """σ of the Thurstone labeler whose expected flip fraction over these (gap, weight) pairs is `noise`."""
    if noise <= 0:
        return 0.0
    if noise >= 0.5:
        return math.inf
    lo, hi = 0.0, max(gap for gap, _ in gaps)
    while _mean_flip(gaps, hi) < noise:  # the flip fraction rises monotonically from 0 towards 1/2
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if _mean_flip(gaps, mid) < noise:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def gold_ranks(scores: Sequence[float], noise: float, tie_threshold: float, rng: random.Random) -> list[int]:
    """The simulated labeler's ranks (1 = best, ties share a rank) of completions with these gold scores."""
    groups = tie_groups(scores, tie_threshold)
    n_groups = max(groups) + 1
    if n_groups == 1 or noise <= 0:
        return [g + 1 for g in groups]
    members: list[list[int]] = [[] for _ in range(n_groups)]
    for i, g in enumerate(groups):
        members[g].append(i)
    level = [sum(scores[i] for i in m) / len(m) for m in members]  # a group's score: its members' mean
    gaps = [(level[a] - level[b], len(members[a]) * len(members[b]))
            for a in range(n_groups) for b in range(a + 1, n_groups)]
    sigma = calibrate_sigma(gaps, noise)
    if math.isinf(sigma):
        order = list(range(n_groups))
        rng.shuffle(order)
    else:
        noisy = [level[g] + rng.gauss(0.0, sigma) for g in range(n_groups)]
        order = sorted(range(n_groups), key=lambda g: -noisy[g])
    place = {g: r + 1 for r, g in enumerate(order)}
    return [place[g] for g in groups]


def flips_against_gold(scores: Sequence[float], ranks: Sequence[int], tie_threshold: float) -> tuple[int, int]:
    """(flipped, comparisons): pairs gold orders strictly (different tie groups) that `ranks` orders the other
    way; a pair the labeler ties counts as a comparison, not a flip."""
    groups = tie_groups(scores, tie_threshold)
    flipped = comparisons = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if groups[i] == groups[j]:
                continue
            comparisons += 1
            gold_says_i = groups[i] < groups[j]
            if ranks[i] != ranks[j] and (ranks[i] < ranks[j]) != gold_says_i:
                flipped += 1
    return flipped, comparisons


# --------------------------------------------------------------------------------------------- durable appends


def repair_tail(path: Path) -> int:
    """Cut a half-written last line (a process killed mid-write) so the file stays valid JSON lines.

    Returns how many bytes were dropped. Every complete line ends in "\\n", so a tail without one is partial.
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one row as one line and fsync it before returning: once the caller answers, the row is on disk.

    One os.write of the whole line under an exclusive flock, so two processes appending to the same file
    never interleave their lines.
    """
    import fcntl

    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- merging


def _item_key(row: dict[str, Any]) -> str:
    """Which item a row ranks: its prompt and completions (ids differ between to-label files)."""
    return json.dumps([row["prompt"], row["completions"]])


def merge_rankings(inputs: Sequence[Path], output: Path) -> dict[str, Any]:
    """Concatenate several labelers' rankings files into one the reward model trains on.

    Every row is checked as the reward model's loader would check it (a bad row is a DataError naming its file
    and row); exact repeats of a row (the same file merged twice) are dropped. An item ranked by several
    labelers keeps every ranking: each is one person's judgement, and the reward model learns from all. Their
    agreement (the fraction of comparisons both made strictly on which they agree, InstructGPT's ~73 %) is
    returned with the counts.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    repeats = 0
    for path in inputs:
        for lineno, row in read_jsonl(Path(path)):
            if not isinstance(row, dict):
                raise DataError(f"{path}, row {lineno}: expected an object (one ranking)")
            problem = ranking_problem(row)
            if problem:
                raise DataError(f"{path}, row {lineno}, {problem}")
            key = json.dumps(row, sort_keys=True)
            if key in seen:
                repeats += 1
                continue
            seen.add(key)
            rows.append(row)
    if not rows:
        raise DataError(f"{', '.join(map(str, inputs))}: no rankings to merge")
    by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_item[_item_key(row)].append(row)
    agree = both = 0
    for ranked in by_item.values():
        for a in range(len(ranked)):
            for b in range(a + 1, len(ranked)):
                x, y = ranked[a]["ranks"], ranked[b]["ranks"]
                for i in range(len(x)):
                    for j in range(i + 1, len(x)):
                        if x[i] != x[j] and y[i] != y[j]:
                            both += 1
                            agree += (x[i] < x[j]) == (y[i] < y[j])
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    return {
        "rows": len(rows),
        "items": len(by_item),
        "repeats_dropped": repeats,
        "items_ranked_more_than_once": sum(len(v) > 1 for v in by_item.values()),
        "labelers": sorted({str(r.get("labeler")) for r in rows if r.get("labeler") is not None}),
        "shared_comparisons": both,
        "agreement": agree / both if both else None,
    }


def labeled_ids(rows: Iterable[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in rows if isinstance(r, dict) and isinstance(r.get("id"), str)}
