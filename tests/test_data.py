"""pipeline.data: every source and format loads and normalizes; every bad input is one clear DataError."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import (
    DataError,
    load,
    load_corpus,
    load_demonstrations,
    load_prompts,
    load_rankings,
    ranking_pairs,
)

RANKED = {"prompt": "count to two\n", "completions": ["one two", "two", "one one"], "ranks": [1, 3, 2]}
HH_CHOSEN = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Whiskers?"
    "\n\nHuman: Something less common?\n\nAssistant: Maybe Pixel, or Juniper."
)
HH_REJECTED = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Whiskers?"
    "\n\nHuman: Something less common?\n\nAssistant: Cat."
)


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def raises(path: Path | str, row: int | None, field: str | None, detail: str = "") -> Any:
    """pytest.raises for a DataError naming the file, the row and the field (each optional)."""
    parts = [re.escape(str(path))]
    if row is not None:
        parts.append(re.escape(f", row {row}"))
    if field is not None:
        parts.append(re.escape(f", field '{field}'"))
    return pytest.raises(DataError, match="".join(parts) + ".*" + detail)


# ----------------------------------------------------------------------------------------------------
# Sources and normalization


def test_corpus_jsonl_and_txt(tmp_path: Path) -> None:
    ds = load_corpus(str(jsonl(tmp_path / "c.jsonl", [{"text": "a b", "source": "x"}, {"text": "c"}])))
    assert ds.column_names == ["text"] and ds["text"] == ["a b", "c"]
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\n  \nsecond line\r\n")
    assert load_corpus(str(txt))["text"] == ["first line", "second line"]


def test_json_list_and_json_lines(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps([RANKED, RANKED], indent=2))
    assert load_rankings(str(tmp_path / "list.json")).num_rows == 2
    jsonl(tmp_path / "lines.json", [RANKED])
    assert load_rankings(str(tmp_path / "lines.json"))["ranks"] == [[1, 3, 2]]


def test_parquet(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c", "extra": 1}, {"prompt": "", "completion": "d", "extra": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = load_demonstrations(str(tmp_path / "d.parquet"))
    assert ds.column_names == ["prompt", "completion"]
    assert ds["completion"] == ["c", "d"]


def test_csv_with_json_lists(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text('prompt,completions,ranks\n"hi, you",' + '"[""a"", ""b""]","[2, 1]"\n')
    ds = load_rankings(str(path))
    assert ds[0] == {"prompt": "hi, you", "completions": ["a", "b"], "ranks": [2, 1]}


def test_folder_concatenates_sorted_files(tmp_path: Path) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    jsonl(folder / "b.jsonl", [{"prompt": "second"}])
    jsonl(folder / "a.jsonl", [{"prompt": "first"}])
    (folder / "README.md").write_text("not data")
    assert load_prompts(str(folder))["prompt"] == ["first", "second"]


def test_hub_name_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED, "id": 0}])
    calls: list[tuple[str, str]] = []
    real = datasets.load_dataset

    def fake(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return real("json", data_files=str(local), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rankings("Anthropic/hh-rlhf").num_rows == 1
    assert load_rankings("Anthropic/hh-rlhf:test")["ranks"] == [[1, 2]]
    assert calls == [("Anthropic/hh-rlhf", "train"), ("Anthropic/hh-rlhf", "test")]


def test_hub_rows_are_validated_with_hub_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": " "}])
    real = datasets.load_dataset
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split: real("json", data_files=str(local), split="train")
    )
    with raises("owner/prompts:validation", 2, "prompt", "is empty"):
        load_prompts("owner/prompts:validation")


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str, split: str) -> None:
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with raises("nobody/nothing", None, None, "file not found"):
        load_corpus("nobody/nothing")


def test_demonstrations_both_formats(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "u"},
        {"role": "assistant", "content": "hello"},
    ]
    ds = load_demonstrations(str(jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])))
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"][1] == {"role": "user", "content": "hi"}
    ds = load_demonstrations(str(jsonl(tmp_path / "pc.jsonl", [{"prompt": "", "completion": "x"}])))
    assert ds.column_names == ["prompt", "completion"]


def test_prompts_conversational_and_from_other_kinds(tmp_path: Path) -> None:
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "?"},
    ]
    assert load_prompts(str(jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))).column_names == ["messages"]
    ds = load("prompts", str(jsonl(tmp_path / "r.jsonl", [RANKED])))
    assert ds.column_names == ["prompt"] and ds["prompt"] == [RANKED["prompt"]]


def test_pairwise_becomes_k2(tmp_path: Path) -> None:
    ds = load_rankings(
        str(jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}]))
    )
    assert ds[0] == {"prompt": "q", "completions": ["good", "bad"], "ranks": [1, 2]}


def test_hh_rlhf_prefix_split(tmp_path: Path) -> None:
    ds = load_rankings(str(jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])))
    row = ds[0]
    assert row["prompt"] == (
        "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Whiskers?"
        "\n\nHuman: Something less common?\n\nAssistant:"
    )
    assert row["completions"] == [" Maybe Pixel, or Juniper.", " Cat."]
    assert row["ranks"] == [1, 2]
    assert row["prompt"] + row["completions"][0] == HH_CHOSEN


def test_mixed_ranking_formats_normalize_together(tmp_path: Path) -> None:
    rows = [
        RANKED,
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ]
    ds = load_rankings(str(jsonl(tmp_path / "r.jsonl", rows)))
    assert ds.column_names == ["prompt", "completions", "ranks"]
    assert [len(c) for c in ds["completions"]] == [3, 2, 2]


def test_ranking_pairs() -> None:
    assert ranking_pairs([1, 2, 2, 3]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert ranking_pairs([2, 1]) == [(1, 0)]
    assert ranking_pairs([1, 1]) == []


def test_shipped_tiny_data_loads() -> None:
    tiny = Path(__file__).resolve().parents[1] / "data" / "tiny"
    for kind, name in [
        ("corpus", "corpus"),
        ("demonstrations", "demos"),
        ("rankings", "rankings"),
        ("prompts", "prompts"),
    ]:
        assert load(kind, str(tiny / f"{name}.eval.jsonl")).num_rows > 0  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one DataError naming the file, the row and the field


@pytest.mark.parametrize(
    ("kind", "bad", "field", "detail"),
    [
        ("corpus", {"txt": "x"}, "text", "missing"),
        ("corpus", {"text": 3}, "text", "must be a string"),
        ("demonstrations", {"prompt": "p"}, "completion", "missing"),
        ("demonstrations", {"prompt": "p", "completion": "  "}, "completion", "is empty"),
        ("demonstrations", {"prompt": ["p"], "completion": "c"}, "prompt", "must be a string"),
        ("demonstrations", {"text": "t"}, None, "expected 'prompt' and 'completion', or 'messages'"),
        (
            "demonstrations",
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "bot", "content": "c"},
                ]
            },
            "messages[2].role",
            "must be one of system, user, assistant",
        ),
        (
            "demonstrations",
            {"messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "must be a string",
        ),
        (
            "demonstrations",
            {"messages": [{"role": "user", "content": "hi"}]},
            "messages",
            "no assistant turn",
        ),
        ("rankings", {**RANKED, "ranks": [1, 2, 3, 4]}, "ranks", "has 4 entries but 'completions' has 3"),
        ("rankings", {**RANKED, "ranks": [2, 2, 2]}, "ranks", "all completions tied: no comparison"),
        ("rankings", {**RANKED, "ranks": [1, True, 2]}, "ranks[1]", "integer"),
        ("rankings", {**RANKED, "ranks": [1, 0, 2]}, "ranks[1]", "integer >= 1"),
        ("rankings", {**RANKED, "completions": ["a", "", "c"]}, "completions[1]", "is empty"),
        ("rankings", {**RANKED, "completions": "a"}, "completions", "must be a list"),
        ("rankings", {**RANKED, "completions": ["a"], "ranks": [1]}, "completions", "at least 2"),
        ("rankings", {"completions": ["a", "b"], "ranks": [1, 2]}, "prompt", "missing"),
        ("rankings", {**RANKED, "completions": ["a", "b", "a"]}, "completions[2]", "identical"),
        ("rankings", {"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
        ("rankings", {"prompt": "q", "chosen": "a"}, "rejected", "missing"),
        ("rankings", {"chosen": "no turns", "rejected": "x"}, "chosen", "Assistant"),
        (
            "rankings",
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"},
            "rejected",
            "does not share",
        ),
        (
            "rankings",
            {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            "chosen",
            "empty",
        ),
        ("rankings", {"prompt": "q"}, None, "expected 'prompt', 'completions' and 'ranks'"),
        ("prompts", {"prompt": ""}, "prompt", "is empty"),
        (
            "prompts",
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "messages[1].role",
            "must not end with an assistant turn",
        ),
    ],
)
def test_bad_row(tmp_path: Path, kind: str, bad: dict[str, Any], field: str | None, detail: str) -> None:
    good = {
        "corpus": {"text": "fine"},
        "demonstrations": {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        }
        if "messages" in bad
        else {"prompt": "p", "completion": "c"},
        "rankings": RANKED,
        "prompts": {"prompt": "fine"},
    }[kind]
    # good rows on lines 1-2, a blank line 3, the bad row on line 4: the row number is the line number
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(good)}\n{json.dumps(good)}\n\n{json.dumps(bad)}\n{json.dumps(good)}\n")
    with raises(path, 4, field, re.escape(detail)):
        load(kind, str(path))  # type: ignore[arg-type]


def test_error_message_format(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "x.jsonl", [RANKED] * 6 + [{**RANKED, "completions": ["a", "b", "c", "d"]}])
    with pytest.raises(DataError) as e:
        load_rankings(str(path))
    assert str(e.value) == f"{path}, row 7, field 'ranks': has 3 entries but 'completions' has 4"


def test_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "broken\n')
    with raises(path, 3, None, "invalid JSON"):
        load_corpus(str(path))


def test_bad_json_list(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('[\n  {"text": "ok"},\n  {"text": oops}\n]')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 3: invalid JSON")):
        load_corpus(str(path))


def test_row_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('[{"text": "ok"}, "just a string"]')
    with raises(path, 2, None, "expected an object"):
        load_corpus(str(path))


def test_mixed_demonstration_formats(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    path = jsonl(tmp_path / "mixed.jsonl", rows)
    with raises(path, 3, "messages", "conversational.*row 1 is prompt-completion"):
        load_demonstrations(str(path))


def test_mixed_formats_across_folder_files(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    jsonl(tmp_path / "b.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    with raises(tmp_path / "b.jsonl", 1, "prompt", "a.jsonl, row 1 is conversational"):
        load_prompts(str(tmp_path))


def test_bad_row_in_parquet_and_csv(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with raises(tmp_path / "d.parquet", 2, "completion", "is empty"):
        load_demonstrations(str(tmp_path / "d.parquet"))
    (tmp_path / "r.csv").write_text('prompt,completions,ranks\nq,"[""a"", ""b""]","[1, 1]"\n')
    with raises(tmp_path / "r.csv", 1, "ranks", "all completions tied"):
        load_rankings(str(tmp_path / "r.csv"))


def test_missing_file(tmp_path: Path) -> None:
    for missing in [tmp_path / "nope.jsonl", Path("data/nope.jsonl"), Path("nope.parquet")]:
        with raises(missing, None, None, "file not found"):
            load_corpus(str(missing))


def test_empty_sources(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    with raises(tmp_path / "e.jsonl", None, None, "empty"):
        load_corpus(str(tmp_path / "e.jsonl"))
    (tmp_path / "dir").mkdir()
    with raises(tmp_path / "dir", None, None, "no .jsonl"):
        load_corpus(str(tmp_path / "dir"))


def test_txt_only_for_corpora(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a prompt\n")
    with raises(tmp_path / "p.txt", None, None, "corpora only"):
        load_prompts(str(tmp_path / "p.txt"))


def test_skip_invalid_drops_and_counts_bad_rows_but_never_returns_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},  # no preference: as some real hub rows are
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},  # empty reply
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ]
    path = jsonl(tmp_path / "hh.jsonl", rows)
    with raises(path, 2, "rejected", "identical"):
        load_rankings(str(path))  # strict by default
    with caplog.at_level("WARNING", logger="pipeline.data"):
        ds = load_rankings(str(path), skip_invalid=True)
    assert len(ds) == 2 and ds[0]["completions"] == [" Maybe Pixel, or Juniper.", " Cat."]
    assert "skipped 2 of 4 rows" in caplog.text and "hh.jsonl, row 2, field 'rejected'" in caplog.text
    bad = jsonl(tmp_path / "bad.jsonl", rows[1:3])
    with raises(bad, None, None, r"empty: no rows \(all 2 rows invalid; the first: .*row 1"):
        load_rankings(str(bad), skip_invalid=True)
