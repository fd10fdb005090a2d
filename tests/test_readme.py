"""The README's code runs: every shell and Python block a user is told to run is executed here.

How a README block is tagged. The line before every fenced ```bash / ```sh / ```shell /
```python block is an HTML comment (invisible on GitHub) saying what the test does with it:

    <!-- test: run -->            run it as it stands (it needs nothing, or builds what it needs itself)
    <!-- test: chain -->          run it once the tiny chain (pretrain → sft → rm → ppo) is built
    <!-- test: skip (reason) -->  not run here; the reason is required (a hub download, several GPUs, ...)

A block without a tag fails `test_every_code_block_is_tagged`; blocks in other languages (command output,
the layout listing) need none. Add a snippet to the README, tag it, and it is tested.

How a block runs. Once per session the test builds a scratch checkout: a copy of the repository's files
(tracked and untracked, not ignored; this working tree, uncommitted edits included) with a `.venv` that
links to the real one, already installed. The one substitution is the profile: the scratch's
`configs/tiny.yaml` is the tiny profile shrunk by `tests/conftest.py::small_overrides` (data slices,
a few steps per stage; `run_dir` stays `runs/tiny`), so `make ppo` builds the whole chain in about a minute
and every path the README names (`runs/tiny/ppo`, `configs/tiny.yaml`, `data/tiny/...`) means what it
says. In that checkout:
- a shell block runs with `bash -e -o pipefail` (every command must succeed), stdin empty, the venv's
  bin first on PATH, W&B disabled; `make test` and `make test-all` are the only commands not run (a
  shell function answers them: they are this test suite, which cannot run itself);
- a Python block runs as a script with the venv's interpreter: it must exit 0, so its asserts hold;
- a `chain` block first runs `make ppo`, which builds the chain once and is a no-op afterwards.
Blocks run in README order in one checkout, as a reader following the README would run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config, to_dict
from tests.conftest import ROOT, small_overrides

README = ROOT / "README.md"
CODE_LANGUAGES = {"bash", "sh", "shell", "python", "py"}
TAG = re.compile(r"^<!--\s*test:\s*(run|chain|skip\s*\((?P<reason>.+)\))\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
SHELL_PREAMBLE = """\
set -e -o pipefail
make() {  # make test / make test-all are this test suite: everything else runs for real
    case "${1-}" in test|test-all) echo "(make $1: not run inside the tests)"; return 0;; esac
    command make "$@"
}
"""


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    tag: str | None  # run | chain | skip | None
    reason: str | None = None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced code block of the README with the tag on the line before it (blank lines skipped)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, end = i, i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        tag = TAG.match(lines[prev].strip()) if prev >= 0 else None
        kind = None if tag is None else tag.group(1).split("(")[0].strip()
        code = "\n".join(line.removeprefix(m.group("indent")) for line in lines[start + 1 : end]) + "\n"
        blocks.append(Block(start + 1, m.group("lang").lower(), code, kind, tag.group("reason") if tag else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.tag in ("run", "chain")]


def test_every_code_block_is_tagged() -> None:
    untagged = [b.id for b in BLOCKS if b.lang in CODE_LANGUAGES and b.tag is None]
    assert not untagged, f"README code blocks without a <!-- test: run|chain|skip (reason) --> line: {untagged}"
    assert all(b.reason.strip() for b in BLOCKS if b.tag == "skip")
    tags = [line for line in README.read_text().splitlines() if line.strip().startswith("<!-- test:")]
    assert len(tags) == sum(b.tag is not None for b in BLOCKS), "a <!-- test: ... --> line not followed by a block"
    # The harness must stay meaningful: most of the README's code really runs.
    assert len(RUNNABLE) >= 8


def test_the_tag_parser_reads_tags_and_languages() -> None:
    text = "<!-- test: skip (needs 8 GPUs) -->\n```bash\nmake ppo\n```\n\n<!-- test: chain -->\n\n```python\nx = 1\n```\n```\nout\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.tag, b.reason, b.code) for b in blocks] == [
        ("bash", "skip", "needs 8 GPUs", "make ppo\n"), ("python", "chain", None, "x = 1\n"), ("", None, None, "out\n")]


@dataclass
class Checkout:
    path: Path
    env: dict[str, str]
    chain_built: bool = False


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, Path]) -> Checkout:
    """A scratch copy of the repository whose tiny profile runs in seconds per stage (see the module docstring)."""
    path = tmp_path_factory.mktemp("readme") / "rlhf-pipeline"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in files:
        src = ROOT / name
        if name and not name.startswith(".venv") and src.is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / name)
    # The venv, linked part by part so that Python finds pyvenv.cfg beside the scratch's .venv/bin and
    # `make` sees an installed stamp of its own (newer than pyproject.toml: nothing is reinstalled).
    venv = (ROOT / ".venv").resolve()
    (path / ".venv").mkdir()
    for part in venv.iterdir():
        if part.name != ".installed":
            (path / ".venv" / part.name).symlink_to(part)
    (path / ".venv" / ".installed").touch()
    # The substitution: the tiny profile, shrunk; PPO at one optimizer step per iteration without
    # intermediate evaluations or checkpoints, so the README's 60-iteration over-optimization run is short.
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        *small_overrides(small_data, Path("runs/tiny")), "ppo.rollout_batch_size=4", "ppo.minibatch_size=4",
        "ppo.ppo_epochs=1", "ppo.ptx_batch_size=1", "ppo.eval_prompts=4", "ppo.eval_samples_per_prompt=1",
        "ppo.eval_steps=null", "ppo.save_steps=1000", "ppo.table_steps=1000"])
    profile = to_dict(cfg)
    profile.pop("profile")
    (path / "configs" / "tiny.yaml").write_text(
        "# The tiny profile shrunk by tests/test_readme.py (small_overrides): the README's commands in seconds.\n"
        + yaml.safe_dump(profile, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "VIRTUAL_ENV"))}
    env.update(PATH=f"{path / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    return Checkout(path, env)


def run_in(checkout: Checkout, argv: list[str], what: str) -> None:
    result = subprocess.run(argv, cwd=checkout.path, env=checkout.env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{what} failed (exit {result.returncode}) in {checkout.path}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}")


# The blocks that need the chain are slow (make test-all): building it and running the README's stage commands
# costs minutes; the blocks that run on their own (CLI, dry run, env, ...) stay in make test.
@pytest.mark.parametrize("block", [pytest.param(b, marks=pytest.mark.slow) if b.tag == "chain" else b
                                   for b in RUNNABLE], ids=[b.id for b in RUNNABLE])
def test_readme_block_runs(block: Block, checkout: Checkout) -> None:
    if block.tag == "chain" and not checkout.chain_built:
        run_in(checkout, ["make", "ppo"], "building the tiny chain for the README (make ppo)")
        checkout.chain_built = True
    if block.lang in ("python", "py"):
        script = checkout.path / f".readme_block_{block.line}.py"
        script.write_text(block.code)
        run_in(checkout, [str(checkout.path / ".venv" / "bin" / "python"), script.name], block.id)
    else:
        run_in(checkout, ["bash", "-c", SHELL_PREAMBLE + block.code], block.id)


@pytest.mark.slow
def test_make_iterate_is_one_dag(checkout: Checkout) -> None:
    """`make iterate`: round 2 is built from the chain, a second call runs no stage, and the table names it."""
    if not checkout.chain_built:
        run_in(checkout, ["make", "ppo"], "building the tiny chain (make ppo)")
        checkout.chain_built = True

    def make_iterate() -> str:
        result = subprocess.run(["make", "iterate"], cwd=checkout.path, env=checkout.env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    round2 = checkout.path / "runs" / "tiny" / "round-2"
    for done in round2.parent.glob("round-*"):  # the README's own `make iterate` block may have built them
        shutil.rmtree(done)
    first = make_iterate()
    for stage in ("label", "rm", "ppo"):
        assert f"-m pipeline {stage} " in first and (round2 / stage / "summary.json").is_file(), stage
    rm_summary = json.loads((round2 / "rm" / "summary.json").read_text())
    assert rm_summary["config"]["rm"]["extra_train"] == ["runs/tiny/round-2/label/rankings.jsonl"]
    assert rm_summary["config"]["rm"]["init"] == "runs/tiny/sft"
    assert "round 2" in first and "round 1" in first  # the rounds table
    second = make_iterate()
    assert not re.search(r"-m pipeline (pretrain|sft|rm|ppo|label) ", second), second
