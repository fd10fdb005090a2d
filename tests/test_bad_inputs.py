"""The bad-input catalogue: every way a user's data, config or stage chain can be wrong, through the CLI.

Each case sets up one bad input and runs `python -m pipeline <stage> ...` in-process. It must exit with status
2 and print exactly one line, `error: ...`, that names the file, row and field (or the config key, or the
directory) and says what to do; no traceback; and nothing may appear or change under the test's directory,
the run directory included (a snapshot before and after). Most cases fail before any model is loaded; the
few that need a finished stage take the small session models of tests/conftest.py. The README's table
"Bad input and errors" lists these cases with their messages.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.__main__ import main
from tests.conftest import small_overrides

RANKED = {"prompt": "count to two\n", "completions": ["one two", "two", "one one"], "ranks": [1, 3, 2]}
DEMO = {"prompt": "count to two\n", "completion": "one two"}
CHAT = [{"role": "user", "content": "count to two"}, {"role": "assistant", "content": "one two"}]


@dataclass
class Given:
    """What a case runs and what its one error line must contain."""

    stage: str
    overrides: list[str]
    expect: list[str]  # substrings of the error line (after "error: ")
    config: str = "configs/tiny.yaml"
    argv: list[str] | None = None  # the whole command line instead of `stage --config ... overrides`
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


@dataclass
class Ctx:
    tmp: Path
    run: Path
    request: pytest.FixtureRequest
    made: list[Path] = field(default_factory=list)

    def file(self, name: str, content: str | bytes | list[Any]) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = "".join(json.dumps(r) + "\n" for r in content)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def fixture(self, name: str) -> Path:
        return self.request.getfixturevalue(name)

    def stage_copy(self, fixture: str, stage: str) -> Path:
        """A finished small model copied in as this run directory's `stage` output."""
        dst = self.run / stage
        shutil.copytree(self.fixture(fixture), dst)
        return dst


# ------------------------------------------------------------------------------------------------ the cases
# Data: the four kinds (corpus, demonstrations, rankings, prompts), files, folders and formats.


def missing_file(c: Ctx) -> Given:
    return Given("sft", [f"sft.data.train={c.tmp / 'nope.jsonl'}"], [f"{c.tmp / 'nope.jsonl'}: file not found"])


def missing_relative_file(c: Ctx) -> Given:
    return Given("sft", ["sft.data.train=data/nope.jsonl"],
                 ["data/nope.jsonl: file not found", "relative path is read from the current directory"])


def empty_file(c: Ctx) -> Given:
    f = c.file("empty.jsonl", "\n\n")
    return Given("sft", [f"sft.data.train={f}"], [f"{f}: empty: no rows"])


def folder_without_data(c: Ctx) -> Given:
    c.file("docs/README.md", "not data")
    return Given("rm", [f"rm.data.train={c.tmp / 'docs'}"], [f"{c.tmp / 'docs'}: folder has no", ".jsonl", ".csv"])


def invalid_json_line(c: Ctx) -> Given:
    f = c.file("demos.jsonl", json.dumps(DEMO) + "\n" + json.dumps(DEMO) + "\n" + '{"prompt": "a", "completion": \n')
    return Given("sft", [f"sft.data.train={f}"], [f"{f}, row 3: invalid JSON", "column"])


def json_array_in_jsonl(c: Ctx) -> Given:
    f = c.file("demos.jsonl", json.dumps([DEMO, DEMO]) + "\n")
    return Given("sft", [f"sft.data.train={f}"],
                 [f"{f}, row 1: expected an object", "got a list", "a JSON list of rows belongs in a .json file"])


def number_for_string(c: Ctx) -> Given:
    f = c.file("demos.jsonl", [DEMO, {"prompt": "count to one\n", "completion": 1}])
    return Given("sft", [f"sft.data.train={f}"], [f"{f}, row 2, field 'completion': must be a string, got int"])


def string_for_list(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [RANKED, {**RANKED, "completions": "one two, two"}])
    return Given("rm", [f"rm.data.train={f}"],
                 [f"{f}, row 2, field 'completions': must be a list of strings, got a string"])


def empty_string(c: Ctx) -> Given:
    f = c.file("demos.jsonl", [DEMO, {**DEMO, "completion": ""}])
    return Given("sft", [f"sft.data.train={f}"], [f"{f}, row 2, field 'completion': is empty"])


def whitespace_only_text(c: Ctx) -> Given:
    f = c.file("corpus.jsonl", [{"text": "one two three"}, {"text": " \t "}])
    return Given("pretrain", [f"pretrain.data.train={f}"], [f"{f}, row 2, field 'text': is empty"])


def ranks_longer(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [{**RANKED, "ranks": [1, 2, 3, 4]}])
    return Given("rm", [f"rm.data.train={f}"], [f"{f}, row 1, field 'ranks': has 4 entries but 'completions' has 3"])


def ranks_shorter(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [RANKED, {**RANKED, "ranks": [1, 2]}])
    return Given("rm", [f"rm.data.train={f}"], [f"{f}, row 2, field 'ranks': has 2 entries but 'completions' has 3"])


def non_integer_rank(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [{**RANKED, "ranks": [1, 2.5, 3]}])
    return Given("rm", [f"rm.data.train={f}"], [f"{f}, row 1, field 'ranks[1]': must be an integer >= 1 (1 = best)"])


def negative_rank(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [{**RANKED, "ranks": [1, -2, 3]}])
    return Given("rm", [f"rm.data.train={f}"], [f"{f}, row 1, field 'ranks[1]': must be an integer >= 1", "got -2"])


def all_tied(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [{**RANKED, "ranks": [1, 1, 1]}])
    return Given("rm", [f"rm.data.train={f}"], [f"{f}, row 1, field 'ranks': all completions tied: no comparison"])


def one_completion(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [{"prompt": "p", "completions": ["only"], "ranks": [1]}])
    return Given("rm", [f"rm.data.train={f}"],
                 [f"{f}, row 1, field 'completions': needs at least 2 completions to compare, got 1"])


def duplicate_completions(c: Ctx) -> Given:
    f = c.file("rankings.jsonl", [{**RANKED, "completions": ["one two", "two", "one two"]}])
    return Given("rm", [f"rm.data.train={f}"],
                 [f"{f}, row 1, field 'completions[2]': is identical to completions[0] but ranked differently"])


def hh_rlhf_no_shared_prefix(c: Ctx) -> Given:
    f = c.file("hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                             "rejected": "\n\nHuman: bye\n\nAssistant: hello"}])
    return Given("rm", [f"rm.data.train={f}"],
                 [f"{f}, row 1, field 'rejected': does not share the dialogue of 'chosen'", "Assistant:"])


def unknown_role(c: Ctx) -> Given:
    f = c.file("chat.jsonl", [{"messages": CHAT}, {"messages": [{"role": "bot", "content": "hi"}, *CHAT]}])
    return Given("sft", [f"sft.data.train={f}"],
                 [f"{f}, row 2, field 'messages[0].role': must be one of system, user, assistant; got 'bot'"])


def no_assistant_turn(c: Ctx) -> Given:
    f = c.file("chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:1]}])
    return Given("sft", [f"sft.data.train={f}"], [f"{f}, row 2, field 'messages': has no assistant turn"])


def prompt_ends_with_assistant(c: Ctx) -> Given:
    f = c.file("prompts.jsonl", [{"messages": CHAT[:1]}, {"messages": CHAT}])
    return Given("ppo", [f"ppo.data.train={f}"],
                 [f"{f}, row 2, field 'messages[1].role': a prompt must not end with an assistant turn"])


def non_utf8_jsonl(c: Ctx) -> Given:
    f = c.file("corpus.jsonl", b'{"text": "one two"}\n{"text": "caf\xe9 three"}\n')
    return Given("pretrain", [f"pretrain.data.train={f}"],
                 [f"{f}, line 2: not UTF-8 text", "byte 0xe9 at byte 14 of the line", "save the file as UTF-8"])


def non_utf8_csv(c: Ctx) -> Given:
    f = c.file("demos.csv", b"prompt,completion\ncount to two,one two\ncount to one,caf\xe9\n")
    return Given("sft", [f"sft.data.train={f}"], [f"{f}, line 3: not UTF-8 text", "byte 0xe9"])


def csv_missing_column(c: Ctx) -> Given:
    f = c.file("rankings.csv", 'prompt,completions\ncount to two,"[""one two"", ""two""]"\n')
    return Given("rm", [f"rm.data.train={f}"],
                 [f"{f}, row 1, field 'ranks': missing; found columns 'prompt', 'completions'"])


def parquet_wrong_schema(c: Ctx) -> Given:
    f = c.tmp / "demos.parquet"
    pq.write_table(pa.table({"prompt": ["count to two\n", "count to one\n"], "completion": [12, 1]}), f)
    return Given("sft", [f"sft.data.train={f}"], [f"{f}, row 1, field 'completion': must be a string, got int"])


def parquet_not_parquet(c: Ctx) -> Given:
    f = c.file("demos.parquet", b"PAR1 this is not a parquet file")
    return Given("sft", [f"sft.data.train={f}"], [f"{f}: unreadable parquet file", "magic bytes"])


def registry_map_names_absent_column(c: Ctx) -> Given:
    f = c.file("qa.jsonl", [{"question": "count to two\n", "reply": "one two"}])
    return Given("sft", ["datasets.qa.kind=demonstrations", f"datasets.qa.path={f}",
                         "datasets.qa.columns={question: prompt, answer: completion}", "sft.data.train=qa"],
                 [f"{f}, row 1, field 'answer': missing; found columns 'question', 'reply'",
                  "datasets.qa.columns"])


def registry_entry_of_another_kind(c: Ctx) -> Given:
    f = c.file("prompts.jsonl", [{"prompt": "count to two\n"}])
    return Given("rm", ["datasets.p.kind=prompts", f"datasets.p.path={f}", "rm.data.train=p"],
                 ["'rm.data.train' names data set 'p' (datasets.p.kind: prompts), but rm reads rankings there"])


def labelers_file_bad_row(c: Ctx) -> Given:
    a = c.file("ann.jsonl", [{**RANKED, "labeler": "ann"}])
    b = c.file("bob.jsonl", [{**RANKED, "labeler": "bob"}, {**RANKED, "ranks": [1, 0, 2], "labeler": "bob"}])
    out = c.tmp / "merged.jsonl"
    return Given("label", [], [f"{b}, row 2, field 'ranks[1]': must be an integer >= 1"],
                 argv=["label", "--merge", str(a), str(b), "-o", str(out)])


def label_rankings_in_rm_extra_train(c: Ctx) -> Given:
    f = c.file("round1/rankings.jsonl", [RANKED, {**RANKED, "ranks": [2, 2, 2]}])
    return Given("rm", [f"rm.extra_train=[{f}]"], [f"{f}, row 2, field 'ranks': all completions tied"])


def prompt_longer_than_context(c: Ctx) -> Given:
    sft = c.fixture("sft_dir")
    long_prompt = "count to " + " ".join(["nine"] * 400) + "\n"
    f = c.file("demos.jsonl", [DEMO, DEMO, {"prompt": long_prompt, "completion": "one"}])
    return Given("sft", [f"sft.init={sft}", f"sft.data.train={f}"],
                 [f"{f}, row 3, field 'prompt': the prompt is", "longer than the model's context (256)",
                  "sft.max_length (64) cuts a row's end", "shorten the prompt or remove the row"])


# Config: profile file, keys, types, bounds, cross-checks.


def prompt_longer_than_context_dry_run(c: Ctx) -> Given:
    """--dry-run refuses what the stage refuses, reading only the finished pretrain output's tokenizer and config."""
    c.stage_copy("sft_dir", "pretrain")
    given = prompt_longer_than_context(c)
    given.overrides = [o for o in given.overrides if not o.startswith("sft.init=")]
    given.argv = ["sft", "--dry-run", "--config", given.config, *small_overrides(c.fixture("small_data"), c.run),
                  *given.overrides]
    return given


def unknown_config_key(c: Ctx) -> Given:
    return Given("sft", ["sft.learning_rate=1e-4"], ["unknown config key 'sft.learning_rate'; did you mean 'sft.lr'?"])


def wrong_type(c: Ctx) -> Given:
    return Given("rm", ["rm.batch_size=eight"], ["'rm.batch_size' must be an integer, got str 'eight'"])


def negative_learning_rate(c: Ctx) -> Given:
    return Given("ppo", ["ppo.lr=-1e-5"], ["'ppo.lr' must be > 0, got -1e-05"])


def minibatch_not_dividing(c: Ctx) -> Given:
    return Given("ppo", ["ppo.rollout_batch_size=8", "ppo.minibatch_size=3"],
                 ["ppo.minibatch_size (3) must divide ppo.rollout_batch_size (8)"])


def profile_not_a_mapping(c: Ctx) -> Given:
    f = c.file("profile.yaml", "- sft\n- rm\n")
    return Given("sft", [], [f"{f}: the top level must be a mapping of config keys"], config=str(f))


def profile_invalid_yaml(c: Ctx) -> Given:
    f = c.file("profile.yaml", "sft:\n  lr: [1e-4\n")
    return Given("sft", [], [f"{f}, line 3, column 1: not valid YAML (expected ',' or ']'"], config=str(f))


# The stage chain: previous stages missing, unfinished, corrupted or incompatible; a full disk.


def missing_previous_stage(c: Ctx) -> Given:
    return Given("rm", [], [f"no finished model at {c.run / 'sft'}: build it with `make sft PROFILE=tiny`"])


def previous_stage_only_partial(c: Ctx) -> Given:
    (c.run / "sft.partial" / "checkpoints").mkdir(parents=True)
    (c.run / "sft.partial" / "config.json").write_text("{}")
    return Given("rm", [], [f"no finished model at {c.run / 'sft'}", f"{c.run / 'sft.partial'} holds a run that never "
                            "finished", "`make sft PROFILE=tiny` resumes it"])


def truncated_safetensors(c: Ctx) -> Given:
    sft = c.stage_copy("sft_dir", "sft")
    weights = sft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return Given("rm", [], [f"{weights}: corrupted or truncated weights file", "rebuild it with `make sft PROFILE=tiny`"])


def previous_stage_only_pickled(c: Ctx) -> Given:
    sft = c.stage_copy("sft_dir", "sft")
    (sft / "model.safetensors").unlink()
    # Never unpickled: a hostile one would run code (tests/test_safe_loading.py proves it with a live payload).
    torch.save({"transformer.wte.weight": torch.zeros(2)}, sft / "pytorch_model.bin")
    return Given("rm", [], [f"{sft} holds only pickled weights (pytorch_model.bin), which can run code when loaded",
                            "safetensors only", "rebuild it with `make sft PROFILE=tiny`"])


def reward_model_of_another_tokenizer(c: Ctx) -> Given:
    from pipeline.config import TokenizerConfig
    from pipeline.modeling import build_tiny_tokenizer

    c.stage_copy("sft_dir", "sft")
    # The reward model's directory: the SFT model (what a reward model starts from; loaded with a fresh scalar head,
    # it passes every check up to the tokenizer's), so this case needs no rm_dir trained for it.
    rm = c.stage_copy("sft_dir", "rm")
    # Another corpus, the same vocabulary size: a tokenizer as large as the policy's whose ids mean other things.
    corpus = c.file("other_corpus.jsonl", [{"text": f"{w} {w[::-1]} {w.upper()}"} for w in
                                           ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot") * 20])
    other = build_tiny_tokenizer(TokenizerConfig(train_data=str(corpus), vocab_size=600))
    for f in rm.glob("tokenizer*"):
        f.unlink()
    other.save_pretrained(rm)
    return Given("ppo", [], [f"'ppo.reward_model' ({rm}) was trained with another tokenizer than the policy "
                             f"({c.run / 'sft'})", "in the policy's tokenizer but", "the reward model's",
                             "rebuild it from this SFT model: `make rm PROFILE=tiny`"])


def disk_full_while_saving(c: Ctx) -> Given:
    """A full disk while the Trainer writes checkpoint-4: the half-written checkpoint goes, checkpoint-2 (written
    by an earlier, interrupted run) stays the one to resume from, and the run directory is as it was."""
    from transformers import TrainerCallback

    from pipeline.config import load_config
    from pipeline.stages import pretrain

    class Interrupt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise KeyboardInterrupt

    overrides = ["pretrain.max_steps=4", "pretrain.save_steps=2", "pretrain.data.eval=null"]
    cfg = load_config("configs/tiny.yaml", [*small_overrides(c.fixture("small_data"), c.run), *overrides])
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg, callbacks=[Interrupt()])
    kept = c.run / "pretrain.partial" / "checkpoints" / "checkpoint-2"
    assert (kept / "trainer_state.json").is_file()
    real_save = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        real_save(obj, f, *args, **kwargs)

    return Given("pretrain", overrides,
                 ["pretrain: disk full (No space left on device) writing", "checkpoint-4",
                  "removed the half-written checkpoint-4", f"kept the last complete checkpoint {kept}",
                  "run `make pretrain PROFILE=tiny` (or the same command) again to resume from it"],
                 patch=lambda mp: mp.setattr(torch, "save", full_disk))


CASES: list[Callable[[Ctx], Given]] = [
    missing_file, missing_relative_file, empty_file, folder_without_data, invalid_json_line, json_array_in_jsonl,
    number_for_string, string_for_list, empty_string, whitespace_only_text, ranks_longer, ranks_shorter,
    non_integer_rank, negative_rank, all_tied, one_completion, duplicate_completions, hh_rlhf_no_shared_prefix,
    unknown_role, no_assistant_turn, prompt_ends_with_assistant, non_utf8_jsonl, non_utf8_csv, csv_missing_column,
    parquet_wrong_schema, parquet_not_parquet, registry_map_names_absent_column, registry_entry_of_another_kind,
    labelers_file_bad_row, label_rankings_in_rm_extra_train, prompt_longer_than_context,
    prompt_longer_than_context_dry_run,
    unknown_config_key, wrong_type, negative_learning_rate, minibatch_not_dividing, profile_not_a_mapping,
    profile_invalid_yaml,
    missing_previous_stage, previous_stage_only_partial, truncated_safetensors, previous_stage_only_pickled,
    reward_model_of_another_tokenizer,
    disk_full_while_saving,
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time, and every folder (a folder's own mtime
    moves when something is created in it and removed again, which leaves nothing behind)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(
    case: Callable[[Ctx], Given], small_data: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = Ctx(tmp_path / "in", tmp_path / "in" / "runs", request)
    ctx.run.mkdir(parents=True)
    given = case(ctx)
    before = snapshot(ctx.tmp)
    capsys.readouterr()
    # Log handlers (the CLI's logging.basicConfig, transformers' own) hold the sys.stderr of their time: each case
    # logs to its own captured stream through the root logger, not to an earlier case's closed one.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger("transformers"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    if given.patch:
        given.patch(monkeypatch)
    argv = given.argv or [given.stage, "--config", given.config, *small_overrides(small_data, ctx.run),
                          *given.overrides]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one error line, the last thing printed
    for part in given.expect:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    assert snapshot(ctx.tmp) == before, "something was written"
