"""`python -m pipeline <stage> --dry-run`: counts, one example as the model sees it, and nothing written."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, small_overrides

from pipeline import dryrun
from pipeline.config import Config, ConfigError
from pipeline.modeling import build_tiny_model, build_tiny_tokenizer
from pipeline.stages import sft


def dry_run(stage: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", stage, "--dry-run", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def snapshot(*dirs: Path) -> dict[str, int]:
    """Every file and directory under `dirs` with its modification time (missing dirs: nothing)."""
    return {str(p): p.stat().st_mtime_ns for d in dirs if d.exists() for p in [d, *d.rglob("*")]}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "ppo"])
def test_dry_run_each_stage(stage: str, small_data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    proc = dry_run(stage, *small_overrides(small_data, run_dir))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not run_dir.exists(), "a dry run wrote under the run directory"
    assert "\033[" not in out  # a pipe gets no colour codes, only the [[...]] marks
    assert f"dry run of {stage}: config and data OK" in out
    # On a fresh run_dir no stage is built: the tokenizer is the tiny BPE built in memory, and says so.
    assert "the tiny byte-level BPE, trained in memory on tokenizer.train_data=" in out
    if stage != "pretrain":
        unbuilt = f"nor {run_dir / 'pretrain'}" if stage != "sft" else ""
        assert f"the one {run_dir / dryrun.PREVIOUS[stage]} will carry (not built yet{unbuilt and ', ' + unbuilt})" in out

    if stage == "pretrain":
        assert "documents: 1,500" in out and "documents: 100" in out
        blocks = re.search(r"packed: ([\d,]+) blocks of pretrain.block_size=64 tokens; ([\d,]+) tokens dropped", out)
        total = re.search(r"tokens \(EOS appended to each document\): ([\d,]+) total", out)
        assert blocks and total
        n_blocks, dropped, tokens = (int(x.replace(",", "")) for x in (*blocks.groups(), total[1]))
        assert n_blocks * 64 + dropped == tokens
        assert "example: training block 1 of" in out
    if stage == "sft":
        assert "rows: 200;" in out and "rows: 40;" in out
        assert "0 rows truncated" in out and "0 rows dropped" in out
        # The first demonstration ("count up to four\n" -> "one two three four"): the prompt masked inside
        # [[...]], the completion and its EOS plain.
        assert "| [[count up to four\n    | ]]one two three four<|endoftext|>" in out
        table = re.findall(r"^\s+\d+\s+\d+\s+('.*?')\s+(masked \(-100\)|trained)$", out, re.M)
        assert table[0][1] == "masked (-100)" and table[-1] == ("'<|endoftext|>'", "trained")
        assert ("'\\n'", "masked (-100)") in table and ("'<|endoftext|>'", "trained") in table
        assert [label for _, label in table] == sorted(label for _, label in table)  # masked first, then trained
    if stage == "rm":
        assert "prompts: 200; completions: 800; K distribution: K=4: 200" in out
        pairs = sum(4 * 3 // 2 - _ties(json.loads(line)["ranks"])
                    for line in small_data["rankings_train"].read_text().splitlines())
        assert f"comparisons: {pairs:,} " in out
        # rankings.train row 1: ranks [3, 2, 2, 1] -> 5 comparisons, c2 and c3 tied
        assert "5 of 6 pairs (1 tied, no comparison): c2 > c1, c3 > c1, c4 > c1, c4 > c2, c4 > c3" in out
        assert out.count("reward read at position") == 4
        assert "one two three four five six[[<|endoftext|>]]" in out
        assert "normalization data" in out and "demonstrations: 40;" in out
    if stage == "ppo":
        assert "prompts: 1,000" in out and "exactly as fed to generation" in out
        assert "| repeat the word mouse four times" in out  # data/tiny/prompts.train.jsonl row 1
        assert re.search(r"example: ptx block 1 of [\d,]+ \(32 tokens", out)
        assert "evaluated: the first 4 blocks (ppo.eval_corpus_blocks)" in out
        assert "reward model: " in out and "(not built yet: make rm)" in out


def _ties(ranks: list[int]) -> int:
    return sum(ranks[i] == ranks[j] for i in range(len(ranks)) for j in range(i + 1, len(ranks)))


def test_dry_run_of_the_plain_tiny_profile_writes_nothing() -> None:
    """The default profile, as a user types it: nothing appears or changes under runs/ (no stamps, no W&B run)."""
    watched = (ROOT / "runs", ROOT / "wandb")
    before = snapshot(*watched)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # W&B as a user has it
    proc = dry_run("sft", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "dry run of sft: config and data OK" in proc.stdout and "rows: 3,000;" in proc.stdout
    assert snapshot(*watched) == before


def test_make_dry_run_runs_only_the_dry_run() -> None:
    """`make dry-run STAGE=sft` and `make sft ARGS=--dry-run`: one pipeline command, no stamps, no earlier stage."""
    for goal in (["dry-run", "STAGE=sft"], ["sft", "ARGS=--dry-run"]):
        plan = subprocess.run(["make", "-n", *goal], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        commands = [line for line in plan.splitlines() if "-m pipeline " in line]  # not the install's pipeline.distributed
        assert len(commands) == 1 and "sft" in commands[0] and "--dry-run" in commands[0], plan
    plan = subprocess.run(["make", "-n", "dry-run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "for s in pretrain sft rm ppo" in plan and "stamp" not in plan


def test_bad_data_exits_2_naming_file_row_and_field(small_data: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "count to two\\n", "completion": "one two"}\n{"prompt": "count to one\\n"}\n')
    proc = dry_run("sft", *small_overrides(small_data, tmp_path / "runs"), f"sft.data.train={bad}")
    assert proc.returncode == 2
    assert proc.stderr == f"error: {bad}, row 2, field 'completion': missing; found columns 'prompt'\n"
    assert not (tmp_path / "runs").exists()

    ranks = tmp_path / "rankings.jsonl"
    ranks.write_text('{"prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 2]}\n')
    proc = dry_run("rm", *small_overrides(small_data, tmp_path / "runs"), f"rm.data.train={ranks}")
    assert proc.returncode == 2
    assert proc.stderr == f"error: {ranks}, row 1, field 'ranks': has 2 entries but 'completions' has 3\n"


# ------------------------------------------------------------------------------------------ in-process checks


def _run(cfg: Config, stage: str) -> str:
    out = io.StringIO()
    dryrun.run(cfg, stage, out)
    return out.getvalue()


def test_sft_counts_truncated_and_dropped_rows(make_config, tmp_path: Path) -> None:
    """With a max_length that cuts, the counts match an independent count from the tokenizer: rows longer than
    max_length are truncated; rows whose prompt alone fills max_length keep no trained token and are dropped."""
    cfg = make_config("sft.max_length=9")
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    rows = [json.loads(line) for line in Path(cfg.sft.data.train).read_text().splitlines()]
    prompt_len = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    full_len = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]  # + EOS
    truncated, dropped = sum(n > 9 for n in full_len), sum(n >= 9 for n in prompt_len)
    assert truncated > dropped > 0  # the slice of data/tiny exercises both
    out = _run(cfg, "sft")
    assert f"sft.max_length=9: {truncated:,} rows truncated" in out
    assert f"{dropped:,} rows dropped (no trained token left after truncation)" in out
    assert f"trains on: {len(rows) - dropped:,} rows" in out
    assert not Path(cfg.run_dir).exists()


def test_sft_examples_are_the_trainers(make_config, tmp_path: Path) -> None:
    """`sft.prepare_examples` (what the dry run shows) gives SFTTrainer's own input_ids and labels, for
    prompt-completion rows (with truncation and a dropped row) and for conversational rows."""
    from trl import SFTTrainer

    convo = tmp_path / "convo.jsonl"
    convo.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": f"count to {n}"},
        {"role": "assistant", "content": " ".join(["one", "two", "three"][: i + 1])}]}) + "\n"
        for i, n in enumerate(["one", "two", "three"])))
    for overrides in (["sft.max_length=9"], [f"sft.data.train={convo}", f"sft.data.eval={convo}", "gold_reward=null"]):
        cfg = make_config(*overrides)
        train, held_out, conversational = sft.load_data(cfg)
        tokenizer = build_tiny_tokenizer(cfg.tokenizer)
        args = sft.trl_args(cfg, tmp_path / "out", True, conversational)
        trainer = SFTTrainer(model=build_tiny_model(cfg.model, tokenizer), args=args, train_dataset=train,
                             eval_dataset=held_out, processing_class=tokenizer)
        for name, rows, expected in (("train", train, trainer.train_dataset), ("eval", held_out, trainer.eval_dataset)):
            mine = sft.prepare_examples(rows, tokenizer, args, name)
            assert mine["input_ids"] == expected["input_ids"] and mine["labels"] == expected["labels"]
    # Conversational: the system and user turns and the assistant header are masked, the reply and EOS trained.
    out = _run(cfg, "sft")
    assert "loss on the assistant turns only" in out
    assert "| [[<|system|>\n    | be brief\n    | <|user|>\n    | count to one\n    | <|assistant|>\n" \
           "    | ]]one<|endoftext|>[[\n    | ]]" in out


def test_a_finished_previous_stage_gives_the_tokenizer_and_context(make_config, tmp_path: Path) -> None:
    """Once the previous stage is built, its saved tokenizer and config.json are read (never its weights), and
    its context length bounds max_length as in the stage."""
    cfg = make_config()
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|only-in-the-saved-one|>"]})
    built = Path(cfg.stage_dir("sft"))
    build_tiny_model(cfg.model, tokenizer).config.save_pretrained(built)  # a finished stage's config.json
    tokenizer.save_pretrained(built)
    before = snapshot(built)
    out = _run(cfg, "rm")
    assert f"tokenizer: {built} (the finished sft stage)" in out and "not built yet" not in out
    assert f"{len(tokenizer)} tokens;" in out and "model context 256 positions" in out
    with pytest.raises(ConfigError, match=r"'ppo.max_prompt_length' \+ 'ppo.max_new_tokens' \(250 \+ 8\) exceed "
                       r"the policy's context \(256\)"):
        _run(make_config("ppo.max_prompt_length=250", "ppo.max_new_tokens=8"), "ppo")
    assert snapshot(built) == before


def test_rm_truncation_count_matches_the_tokenizer(make_config) -> None:
    """rm.max_length=12 cuts some sequences: the count is of prompt + completion + EOS longer than 12 tokens."""
    cfg = make_config("rm.max_length=12")
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    rows = [json.loads(line) for line in Path(cfg.rm.data.train).read_text().splitlines()]
    longer = sum(len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(c)["input_ids"]) + 1 > 12
                 for r in rows for c in r["completions"])
    assert 0 < longer < 4 * len(rows)
    out = _run(cfg, "rm")
    assert f"rm.max_length=12: {longer:,} completions truncated" in out
    assert "max 12\n" in out.split("rm.data.train:")[1]


def test_colour_only_on_a_terminal(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the masked span is also dim and the trained one green; the [[...]] marks stay."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Terminal()
    dryrun.run(make_config(), "sft", out)
    assert "\033[2m[[count up to four\n    | ]]\033[0m\033[32mone two three four<|endoftext|>\033[0m" in out.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    out = Terminal()
    dryrun.run(make_config(), "sft", out)
    assert "\033[" not in out.getvalue()


def test_dry_run_reads_registry_names_with_their_column_maps(small_data: dict[str, Path], tmp_path: Path) -> None:
    """A stage data key naming a registry entry: the dry run maps the foreign columns as training would."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "count to two\\n", "answer": "one two"}\n'
                  '{"question": "count to one\\n", "answer": "one"}\n')
    proc = dry_run("sft", *small_overrides(small_data, tmp_path / "runs"), f"datasets.qa.path={qa}",
                   "datasets.qa.kind=demonstrations", "datasets.qa.columns={question: prompt, answer: completion}",
                   "sft.data.train=qa")
    assert proc.returncode == 0, proc.stderr
    assert "rows: 2;" in proc.stdout and "one two" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_sft_packing_shows_the_trainers_packed_rows(make_config, tmp_path: Path) -> None:
    """With sft.packing the dry run still counts and shows each demonstration, then says how many packed rows
    training gets: the number SFTTrainer's own packed dataset has; the first batch is one padding-free row."""
    from trl import SFTTrainer

    cfg = make_config("sft.packing=true", "sft.max_length=64")
    train, held_out, _ = sft.load_data(cfg)
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    args = sft.trl_args(cfg, tmp_path / "out", True, False)
    trainer = SFTTrainer(model=build_tiny_model(cfg.model, tokenizer), args=args, train_dataset=train,
                         eval_dataset=held_out, processing_class=tokenizer)
    assert sft.prepare_examples(train, tokenizer, args, "train")["input_ids"] == trainer.train_dataset["input_ids"]
    out = _run(cfg, "sft")
    assert f"trains on: {len(train):,} rows" in out  # each demonstration, as without packing
    assert f"sft.packing: {len(train):,} examples packed into {len(trainer.train_dataset):,} rows of at most 64" in out
    assert out.count("sft.packing:") == 2  # the train set's line and the first batch's; the held-out set is not packed
    assert re.search(r"first batch: input_ids \[\d+, \d+\] \(sft.packing: \d+ packed rows holding \d+ examples", out)
