"""The data registry: named data sets in a profile's `datasets:`, column maps for foreign files, the fix an
unmapped file's error suggests, strict registry config, resolution in `config` and the Makefile stamps, and
SFT and RM trained from foreign files through registry entries.

The shipped entries (configs/datasets/hub.yaml) point at hub data sets that cannot be downloaded here; each
column map is tested on local files written in exactly the shape of its hub set (field names and nesting
as on the data set cards), as .jsonl and as .parquet (how the hub serves them: nested lists of structs).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.__main__ import main, write_stamps
from pipeline.config import Config, ConfigError, DatasetConfig, load_config, stage_key
from pipeline.data import DataError, load, ranking_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def local(entry: DatasetConfig, path: Path) -> DatasetConfig:
    """A shipped hub entry pointed at a local file, its kind and column map unchanged."""
    return dataclasses.replace(entry, hub=None, split=None, subset=None, data_dir=None, path=str(path))


# ----------------------------------------------------------------------------------------------------
# Rows in the shape of each shipped entry's hub data set, and what they must normalize to.

HH = {
    "chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Whiskers?",
    "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Cat.",
}
STACK = {  # lvwerra/stack-exchange-paired: response_j has more votes than response_k
    "qid": 12, "question": "How do I reverse a list in Python?", "date": "2014/03/02",
    "metadata": ["https://stackoverflow.com/questions/12"], "response_j": "Use reversed(xs) or xs[::-1].",
    "response_k": "Write a loop.",
}
ALPACA = [  # tatsu-lab/alpaca: instruction, input (often empty), output, and the formatted text
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move.",
     "text": "Below is an instruction that describes a task. ..."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
     "text": "Below is an instruction that describes a task, paired with an input ..."},
]
SLIMORCA = {  # Open-Orca/SlimOrca: ShareGPT conversations with a per-turn loss weight
    "conversations": [
        {"from": "system", "value": "You are a helpful assistant.", "weight": None},
        {"from": "human", "value": "What is 2 + 2?", "weight": 0.0},
        {"from": "gpt", "value": "4", "weight": 1.0},
    ]
}


def _uf_completion(model: str, response: str, score: float) -> dict[str, Any]:
    rating = {"Rating": "4", "Rationale": "Clear."}
    return {
        "annotations": {"helpfulness": rating, "honesty": rating, "instruction_following": rating,
                        "truthfulness": rating},
        "critique": "Fine.", "custom_system_prompt": "Be helpful.", "fine-grained_score": score / 2,
        "model": model, "overall_score": score, "principle": "helpfulness", "response": response,
    }


ULTRAFEEDBACK = {  # openbmb/UltraFeedback: 4 completions per instruction, each with its overall_score
    "source": "evol_instruct", "instruction": "Name a prime number.",
    "models": ["gpt-4", "llama-2-7b-chat", "bard", "wizardlm-7b"],
    "completions": [
        _uf_completion("gpt-4", "7", 8.5), _uf_completion("llama-2-7b-chat", "9", 3.0),
        _uf_completion("bard", "Seven.", 8.5), _uf_completion("wizardlm-7b", "2 is prime.", 7.0),
    ],
    "correct_answers": ["2"], "incorrect_answers": ["9"],
}
ULTRACHAT = {  # HuggingFaceH4/ultrachat_200k: the first user turn as `prompt`, the whole chat in `messages`
    "prompt": "Name a river.", "prompt_id": "0f3a" * 16,
    "messages": [{"content": "Name a river.", "role": "user"}, {"content": "The Nile.", "role": "assistant"},
                 {"content": "Another?", "role": "user"}, {"content": "The Rhine.", "role": "assistant"}],
}
FINEWEB = {  # HuggingFaceFW/fineweb-edu: a web page's text and its crawl metadata
    "text": "Photosynthesis turns light into chemical energy.", "id": "<urn:uuid:1>", "dump": "CC-MAIN-2024-10",
    "url": "https://example.org/a", "file_path": "s3://commoncrawl/x.warc.gz", "language": "en",
    "language_score": 0.97, "token_count": 9, "score": 3.2, "int_score": 3,
}
UF_RANKED = [{"prompt": "Name a prime number.", "completions": ["7", "9", "Seven.", "2 is prime."],
              "ranks": [1, 3, 1, 2]}]

# entry name -> (rows in its hub set's shape, the normalized rows)
SHAPES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "hh_rlhf": ([HH], [{"prompt": "\n\nHuman: What is a good name for a cat?\n\nAssistant:",
                        "completions": [" How about Whiskers?", " Cat."], "ranks": [1, 2]}]),
    "hh_rlhf_test": ([HH], [{"prompt": "\n\nHuman: What is a good name for a cat?\n\nAssistant:",
                             "completions": [" How about Whiskers?", " Cat."], "ranks": [1, 2]}]),
    "stack_exchange_paired": ([STACK], [{"prompt": STACK["question"],
                                         "completions": [STACK["response_j"], STACK["response_k"]], "ranks": [1, 2]}]),
    "alpaca": (ALPACA, [{"prompt": "Give three tips for staying healthy.", "completion": "Eat well, sleep, move."},
                        {"prompt": "Translate to French.\n\nGood morning", "completion": "Bonjour"}]),
    "slimorca": ([SLIMORCA], [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                            {"role": "user", "content": "What is 2 + 2?"},
                                            {"role": "assistant", "content": "4"}]}]),
    # equal scores tie; higher scores rank better
    "ultrafeedback": ([ULTRAFEEDBACK], UF_RANKED),
    "ultrafeedback_train": ([ULTRAFEEDBACK], UF_RANKED),
    "ultrafeedback_heldout": ([ULTRAFEEDBACK], UF_RANKED),
    "ultrafeedback_prompts": ([ULTRAFEEDBACK], [{"prompt": "Name a prime number."}]),
    "ultrafeedback_prompts_train": ([ULTRAFEEDBACK], [{"prompt": "Name a prime number."}]),
    "ultrafeedback_prompts_heldout": ([ULTRAFEEDBACK], [{"prompt": "Name a prime number."}]),
    "ultrachat": ([ULTRACHAT], [{"messages": ULTRACHAT["messages"]}]),
    "ultrachat_test": ([ULTRACHAT], [{"messages": ULTRACHAT["messages"]}]),
    "fineweb_edu": ([FINEWEB], [{"text": FINEWEB["text"]}]),
    "fineweb_edu_heldout": ([FINEWEB], [{"text": FINEWEB["text"]}]),
}


@pytest.fixture(scope="module")
def shipped() -> dict[str, DatasetConfig]:
    return load_config(TINY).datasets


def test_every_shipped_entry_has_a_shape_test(shipped: dict[str, DatasetConfig]) -> None:
    assert set(shipped) == set(SHAPES), "add rows in the new entry's hub shape to SHAPES"
    assert {e.hub for e in shipped.values()} >= {
        "Anthropic/hh-rlhf", "tatsu-lab/alpaca", "Open-Orca/SlimOrca", "openbmb/UltraFeedback",
        "HuggingFaceH4/ultrachat_200k", "HuggingFaceFW/fineweb-edu",
    }
    for name, entry in shipped.items():  # a sliced split ("train[:98%]") must be one datasets can read
        if entry.split is not None:
            assert str(datasets.ReadInstruction.from_spec(entry.split)), name
    assert load_config(ROOT / "configs" / "gpt2.yaml").datasets == shipped  # both profiles include it


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shipped_column_map_reads_its_hub_shape(
    tmp_path: Path, shipped: dict[str, DatasetConfig], name: str, suffix: str
) -> None:
    rows, want = SHAPES[name]
    write = jsonl if suffix == ".jsonl" else parquet
    entry = local(shipped[name], write(tmp_path / f"{name}{suffix}", rows))
    got = load(entry.kind, entry)  # type: ignore[arg-type]
    assert got.to_list() == want


def test_hub_entry_passes_split_and_data_dir_to_load_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shipped: dict[str, DatasetConfig]
) -> None:
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def fake(path: str, split: str, **options: Any) -> datasets.Dataset:  # load_dataset's own parameter names
        calls.append((path, split, options))
        rows = {"lvwerra/stack-exchange-paired": [STACK], "HuggingFaceFW/fineweb-edu": [FINEWEB]}.get(path, [HH])
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load("rankings", "stack_exchange_paired", registry=shipped)["prompt"] == [STACK["question"]]
    assert load("rankings", "hh_rlhf_test", registry=shipped).num_rows == 1
    assert load("corpus", "fineweb_edu_heldout", registry=shipped).num_rows == 1
    assert calls == [("lvwerra/stack-exchange-paired", "train", {"data_dir": "data/reward"}),
                     ("Anthropic/hh-rlhf", "test", {}),
                     ("HuggingFaceFW/fineweb-edu", "train[-2000:]", {"name": "sample-10BT"})]


# ----------------------------------------------------------------------------------------------------
# Column maps: errors name the foreign field


def test_parallel_score_lists_and_a_csv(tmp_path: Path) -> None:
    entry = DatasetConfig(
        path=str(jsonl(tmp_path / "r.jsonl", [{"q": "p", "outs": ["a", "b", "c"], "rewards": [0.5, 2, 0.5]}])),
        kind="rankings", columns={"q": "prompt", "outs": "completions", "rewards": "scores"},
    )
    assert load("rankings", entry).to_list() == [{"prompt": "p", "completions": ["a", "b", "c"], "ranks": [2, 1, 2]}]
    csv_file = tmp_path / "r.csv"  # list-valued foreign columns of a CSV hold JSON, as our own do
    csv_file.write_text('q,outs,rewards\np,"[""a"", ""b""]","[1, 3]"\n')
    got = load("rankings", dataclasses.replace(entry, path=str(csv_file)))
    assert got.to_list() == [{"prompt": "p", "completions": ["a", "b"], "ranks": [2, 1]}]
    assert ranking_pairs(got[0]["ranks"]) == [(1, 0)]


@pytest.mark.parametrize(
    ("name", "row", "field", "detail"),
    [
        ("alpaca", {**ALPACA[0], "output": " "}, "output", "is empty"),
        ("alpaca", {"input": "x", "output": "y"}, None, None),  # instruction missing: input alone is the prompt
        ("ultrafeedback", {**ULTRAFEEDBACK, "completions": [ULTRAFEEDBACK["completions"][0],
                                                            {**ULTRAFEEDBACK["completions"][1], "overall_score": None}]},
         "completions[1].overall_score", "must be a number"),
        ("ultrafeedback", {**ULTRAFEEDBACK, "completions": [{**ULTRAFEEDBACK["completions"][0], "response": ""},
                                                            ULTRAFEEDBACK["completions"][1]]},
         "completions[0].response", "is empty"),
        ("ultrafeedback", {**ULTRAFEEDBACK, "completions": ULTRAFEEDBACK["completions"][:1]},
         "completions.response", "at least 2"),
        ("slimorca", {"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "yo"}]},
         "conversations[1].from",
         r"must be one of system, user, assistant; got 'bing'; say which it is in datasets\.slimorca\.roles, e\.g\. "
         r"\{bing: assistant\}"),
        ("slimorca", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
         "conversations[1].value", "missing"),
        ("stack_exchange_paired", {**STACK, "response_k": STACK["response_j"]}, "response_k", "identical"),
    ],
)
def test_row_errors_name_the_foreign_field(
    tmp_path: Path, shipped: dict[str, DatasetConfig], name: str, row: dict[str, Any], field: str | None,
    detail: str | None,
) -> None:
    path = jsonl(tmp_path / "x.jsonl", [SHAPES[name][0][0], row])
    registry = {name: local(shipped[name], path)}
    kind = registry[name].kind
    if field is None:
        assert load(kind, name, registry=registry)[1]["prompt"] == "x"  # type: ignore[arg-type]
        return
    with pytest.raises(DataError, match=re.escape(f"{path}, row 2, field '{field}'") + ".*" + detail):
        load(kind, name, registry=registry)  # type: ignore[arg-type]


def test_roles_name_other_assistants(tmp_path: Path, shipped: dict[str, DatasetConfig]) -> None:
    path = jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                           {"from": "bing", "value": "yo"}]}])
    entry = dataclasses.replace(local(shipped["slimorca"], path), roles={"bing": "assistant"})
    assert load("demonstrations", entry)[0]["messages"][1] == {"role": "assistant", "content": "yo"}


# ----------------------------------------------------------------------------------------------------
# An unmapped foreign file: the error names what the stage expects, what it found, and the fix


UNMAPPED = [
    ("demonstrations", {"question": "q", "answer": "a"}, "expected 'prompt' and 'completion', or 'messages'",
     "'question', 'answer'", "{question: prompt, answer: completion}"),
    ("demonstrations", ALPACA[1], "expected 'prompt' and 'completion', or 'messages'",
     "'instruction', 'input', 'output', 'text'", "{instruction: prompt, input: prompt, output: completion}"),
    ("demonstrations", SLIMORCA, "expected 'prompt' and 'completion', or 'messages'", "'conversations'",
     "{conversations: messages, from: role, value: content}"),
    ("rankings", STACK, "expected 'prompt', 'completions' and 'ranks'", "'qid', 'question', 'date', 'metadata', "
     "'response_j', 'response_k'", "{question: prompt, response_j: chosen, response_k: rejected}"),
    ("rankings", ULTRAFEEDBACK, "field 'prompt': missing", "'source', 'instruction', 'models', 'completions'",
     "{instruction: prompt, completions.response: completions, completions.overall_score: scores}"),
    ("prompts", {"query": "q", "id": 3}, "expected 'prompt' or 'messages'", "'query', 'id'", "{query: prompt}"),
    ("corpus", {"content": "some text"}, "field 'text': missing", "'content'", "{content: text}"),
]


@pytest.mark.parametrize(("kind", "row", "expected", "found", "fix"), UNMAPPED, ids=[u[4] for u in UNMAPPED])
def test_unmapped_file_error_names_expected_found_and_the_fix(
    tmp_path: Path, kind: str, row: dict[str, Any], expected: str, found: str, fix: str
) -> None:
    path = jsonl(tmp_path / "foreign.jsonl", [row])
    with pytest.raises(DataError) as e:
        load(kind, str(path))  # type: ignore[arg-type]
    message = str(e.value)
    assert message.startswith(f"{path}, row 1")
    assert expected in message
    assert f"found columns {found}" in message
    assert f"map them in the registry: columns: {fix}" in message
    # the suggested map, put in a registry entry, reads the file
    columns = dict(item.split(": ") for item in fix.strip("{}").split(", "))
    assert load(kind, DatasetConfig(path=str(path), kind=kind, columns=columns)).num_rows == 1  # type: ignore[arg-type]


def test_wrong_map_error_names_the_entry_and_the_full_fix(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    registry = {"qa": DatasetConfig(path=str(path), kind="demonstrations", columns={"question": "prompt"})}
    with pytest.raises(DataError, match=re.escape(
        f"{path}, row 1, field 'completion': missing; found columns 'question', 'answer'; map them in the "
        "registry: datasets.qa.columns: {question: prompt, answer: completion}"
    )):
        load("demonstrations", "qa", registry=registry)


def test_unguessable_file_still_names_expected_and_found(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "odd.jsonl", [{"foo": "x", "bar": "y"}])
    with pytest.raises(DataError, match=re.escape(
        f"{path}, row 1: expected 'prompt' and 'completion', or 'messages' (SFT demonstrations); found columns "
        "'foo', 'bar'; map the file's columns to these in a registry entry's columns"
    )):
        load("demonstrations", str(path))


# ----------------------------------------------------------------------------------------------------
# Strict registry config


def _entry(**kw: Any) -> list[str]:
    return [f"datasets.mine.{k}={v}" for k, v in kw.items()]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (_entry(pth="x.jsonl", kind="corpus"), r"unknown config key 'datasets\.mine\.pth'; did you mean "
                                               r"'datasets\.mine\.path'\?"),
        (_entry(path="x.jsonl"), r"missing required config key 'datasets\.mine\.kind'"),
        (_entry(path="x.jsonl", kind="ranking"), r"'datasets\.mine\.kind' must be one of 'corpus', "),
        (_entry(path="x.jsonl", hub="a/b", kind="corpus"), r"datasets\.mine: give exactly one of 'path'"),
        (_entry(kind="corpus"), r"datasets\.mine: give exactly one of 'path'"),
        (_entry(path="x.jsonl", split="test", kind="corpus"), r"datasets\.mine: 'split' is for hub data sets"),
        (_entry(hub="no-owner", kind="corpus"), r"datasets\.mine: 'hub' must be a hub data set id owner/name"),
        (_entry(path="x.jsonl", kind="demonstrations", columns="{question: promt}"),
         r"datasets\.mine: columns\.question: 'promt' is not a field of demonstrations; did you mean 'prompt'\?"),
        (_entry(path="x.jsonl", kind="rankings", columns="{a: completions, b: completions}"),
         r"datasets\.mine: columns: a, b all map to 'completions'; only prompt, completion, text can be joined"),
        (_entry(path="x.jsonl", kind="demonstrations", roles="{bot: helper}"),
         r"datasets\.mine: roles\.bot: must be one of system, user, assistant"),
        (_entry(path="x.jsonl", kind="corpus", roles="{bot: assistant}"), r"corpus have no messages"),
        (_entry(path="x.jsonl", kind="demonstrations", columns="[question]"),
         r"'datasets\.mine\.columns' must be a mapping"),
        (["datasets.my/data.path=x.jsonl", "datasets.my/data.kind=corpus"], r"datasets\.my/data: a data set name"),
        (["sft.data.train=my_demos"], r"'sft\.data\.train': 'my_demos' is neither a data set of the registry "
                                      r"\(the registry has alpaca, .*\) nor an existing file or folder"),
        (["sft.data.train=alpacca"], r"did you mean 'alpaca'\?"),
        (["rm.data.train=alpaca"], r"'rm\.data\.train' names data set 'alpaca' \(datasets\.alpaca\.kind: "
                                   r"demonstrations\), but rm reads rankings there"),
        (["ppo.ptx_data=hh_rlhf"], r"'ppo\.ptx_data' names data set 'hh_rlhf' .*rankings.*ppo reads corpus"),
        (["rm.normalize_data=ultrafeedback"], r"'rm\.normalize_data' .* but rm reads demonstrations there"),
        (["tokenizer.train_data=slimorca"], r"'tokenizer\.train_data' names data set 'slimorca'.*reads corpus"),
    ],
)
def test_registry_config_is_strict(overrides: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_config(TINY, overrides)


def test_cli_names_a_bad_registry_reference_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", "sft.data.train=alpacca"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'sft.data.train': 'alpacca' is neither a data set of the registry (did you mean "
                          "'alpaca'?") and "Traceback" not in err


def test_include_must_exist_and_profile_wins(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    extra = tmp_path / "extra.yaml"
    profile.write_text(TINY.read_text().replace("include: [configs/datasets/hub.yaml]", f"include: [{extra}]"))
    with pytest.raises(ConfigError, match=re.escape(f"include '{extra}': no such file")):
        load_config(profile)
    extra.write_text(
        "datasets:\n  q: {path: a.jsonl, kind: prompts}\nsft: {lr: 0.5}\n"
    )
    profile.write_text(profile.read_text() + "datasets:\n  q: {path: b.jsonl}\n")
    cfg = load_config(profile)
    assert cfg.datasets["q"] == DatasetConfig(path="b.jsonl", kind="prompts")  # merged key by key; the profile wins
    assert cfg.sft.lr == 1.0e-3  # tiny.yaml's own sft.lr overrides the included one


# ----------------------------------------------------------------------------------------------------
# Resolution: visible in `config`, and part of each stage's key and stamp


def test_config_output_shows_resolution(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert main(["config", *_entry(path=str(path), kind="demonstrations", columns="{question: prompt, answer: "
                                   "completion}"), "sft.data.train=mine", "rm.data.train=ultrafeedback"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"#   sft\.data\.train +mine = {re.escape(str(path))}  \[demonstrations; columns question "
                     r"-> prompt, answer -> completion\]", out)
    assert re.search(r"#   rm\.data\.train +ultrafeedback = openbmb/UltraFeedback:train  \[rankings; columns "
                     r"instruction -> prompt, completions\.response -> completions", out)
    assert re.search(r"#   rm\.normalize_data \(null: sft\.data\.eval\) +data/tiny/demos\.eval\.jsonl", out)


def test_editing_an_entry_or_its_file_rebuilds_the_stages_that_read_it(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    base = [f"run_dir={tmp_path / 'runs'}", *_entry(path=str(path), kind="demonstrations"), "sft.data.train=mine"]

    def stamps(*extra: str) -> dict[str, str]:
        cfg = load_config(TINY, [*base, *extra])
        write_stamps(cfg)
        return {s: (tmp_path / "runs" / ".stamps" / f"{s}.json").read_text() for s in ("pretrain", "sft", "rm")}

    first = stamps("datasets.mine.columns={question: prompt}")
    assert str(path) in first["sft"] and '"datasets"' in first["sft"]
    remapped = stamps("datasets.mine.columns={question: prompt, answer: completion}")
    assert remapped["sft"] != first["sft"]
    assert remapped["pretrain"] == first["pretrain"] and remapped["rm"] == first["rm"]
    path.write_text(path.read_text() + json.dumps({"question": "q2", "answer": "a2"}) + "\n")
    edited = stamps("datasets.mine.columns={question: prompt, answer: completion}")
    assert edited["sft"] != remapped["sft"] and edited["pretrain"] == remapped["pretrain"]
    # an entry no stage names changes no stage
    cfg = load_config(TINY, base)
    other = load_config(TINY, [*base, "datasets.alpaca.split=train[:10]"])
    assert all(stage_key(cfg, s) == stage_key(other, s) for s in ("pretrain", "sft", "rm", "ppo"))


# ----------------------------------------------------------------------------------------------------
# SFT and RM trained from foreign files through registry entries


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # trains sft and rm twice (native and foreign files): make test-all
def test_sft_and_rm_train_from_foreign_files_through_the_registry(
    tmp_path: Path, small_data: dict[str, Path], make_config: Callable[..., Config]
) -> None:
    """Alpaca-shaped demonstrations, question/answer held-out ones, and UltraFeedback-shaped rankings (scores,
    not ranks): each stage trains on them exactly as on the native files it was converted from."""
    from pipeline.stages import pretrain, rm, sft

    d = tmp_path / "foreign"
    d.mkdir()
    alpaca = jsonl(d / "alpaca.jsonl", [{"instruction": r["prompt"], "input": "", "output": r["completion"]}
                                        for r in _rows(small_data["demos_train"])])
    qa = jsonl(d / "qa.jsonl", [{"question": r["prompt"], "answer": r["completion"]}
                                for r in _rows(small_data["demos_eval"])])

    def ultrafeedback(src: Path, dst: Path) -> Path:
        return jsonl(dst, [{"instruction": r["prompt"], "completions": [
            {"response": c, "overall_score": 10.0 - 2 * k, "model": "m"} for c, k in zip(r["completions"], r["ranks"],
                                                                                         strict=True)]}
            for r in _rows(src)])

    uf_train = ultrafeedback(small_data["rankings_train"], d / "uf.train.jsonl")
    uf_eval = ultrafeedback(small_data["rankings_eval"], d / "uf.eval.jsonl")
    registry = [
        *[f"datasets.demos.{k}={v}" for k, v in (("path", alpaca), ("kind", "demonstrations"),
                                                 ("columns", "{instruction: prompt, input: prompt, output: completion}"))],
        *[f"datasets.qa.{k}={v}" for k, v in (("path", qa), ("kind", "demonstrations"),
                                              ("columns", "{question: prompt, answer: completion}"))],
        *[f"datasets.{n}.{k}={v}" for n, p in (("uf", uf_train), ("uf_eval", uf_eval)) for k, v in (
            ("path", p), ("kind", "rankings"),
            ("columns", "{instruction: prompt, completions.response: completions, completions.overall_score: scores}"))],
        "sft.data.train=demos", "sft.data.eval=qa", "rm.data.train=uf", "rm.data.eval=uf_eval",
    ]
    native = make_config(run_dir=tmp_path / "native")
    foreign = make_config(*registry, run_dir=tmp_path / "foreign")
    # the same prompts, completions and comparisons as the native file (the ranks may be numbered differently)
    mapped, original = load("rankings", "uf", registry=foreign.datasets), _rows(small_data["rankings_train"])
    assert mapped["prompt"] == [r["prompt"] for r in original]
    assert mapped["completions"] == [r["completions"] for r in original]
    assert [ranking_pairs(r) for r in mapped["ranks"]] == [ranking_pairs(r["ranks"]) for r in original]

    pretrain.run(native)
    for cfg in (native, foreign):  # both start from the same pretrained model
        cfg.sft.init = str(native.stage_dir("pretrain"))
    sft_native, sft_foreign = sft.run(native), sft.run(foreign)
    assert (foreign.stage_dir("sft") / "summary.json").is_file()
    assert sft_foreign["train/loss"] == pytest.approx(sft_native["train/loss"], abs=1e-6)
    assert sft_foreign["eval/loss"] == pytest.approx(sft_native["eval/loss"], abs=1e-6)

    for cfg in (native, foreign):
        cfg.rm.init = str(native.stage_dir("sft"))
    rm_native, rm_foreign = rm.run(native), rm.run(foreign)
    summary = json.loads((foreign.stage_dir("rm") / "summary.json").read_text())
    assert summary["config"]["rm"]["data"]["train"] == "uf"
    assert rm_foreign["eval/pairwise_acc"] == pytest.approx(rm_native["eval/pairwise_acc"], abs=1e-6)
    assert rm_foreign["eval/loss"] == pytest.approx(rm_native["eval/loss"], abs=1e-6)
    assert rm_foreign["train/loss"] == pytest.approx(rm_native["train/loss"], abs=1e-6)
