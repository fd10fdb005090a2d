"""Shared fixtures: small slices of the shipped tiny data, and tiny-profile configs pointed at a temp run dir."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"

os.chdir(ROOT)  # tests name configs/ and data/ relative to the repository, as users do
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_group(cmd: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, ...)` for multi-process launches: the command runs in a
    session of its own, and a timeout (or any error while waiting) kills the whole process group, so the ranks
    a launcher started do not outlive a failed test and slow every test after it (subprocess.run would kill
    only the launcher)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)  # type: ignore[call-overload]
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def head(src: Path, dst: Path, n: int) -> Path:
    """The first n rows of a jsonl file."""
    lines = src.read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Slices of data/tiny small enough for second-scale stage runs."""
    d = tmp_path_factory.mktemp("data")
    return {
        "corpus_train": head(TINY / "corpus.train.jsonl", d / "corpus.train.jsonl", 1500),
        "corpus_eval": head(TINY / "corpus.eval.jsonl", d / "corpus.eval.jsonl", 100),
        "demos_train": head(TINY / "demos.train.jsonl", d / "demos.train.jsonl", 200),
        "demos_eval": head(TINY / "demos.eval.jsonl", d / "demos.eval.jsonl", 40),
        "rankings_train": head(TINY / "rankings.train.jsonl", d / "rankings.train.jsonl", 200),
        "rankings_eval": head(TINY / "rankings.eval.jsonl", d / "rankings.eval.jsonl", 40),
    }


def small_overrides(small_data: dict[str, Path], run_dir: Path) -> list[str]:
    """Overrides that shrink the tiny profile to second-scale stage runs on the small data slices."""
    return [
        f"run_dir={run_dir}",
        f"tokenizer.train_data={small_data['corpus_train']}",
        f"pretrain.data.train={small_data['corpus_train']}",
        f"pretrain.data.eval={small_data['corpus_eval']}",
        f"sft.data.train={small_data['demos_train']}",
        f"sft.data.eval={small_data['demos_eval']}",
        "model.tiny.n_layer=2",
        "model.tiny.n_embd=64",
        "tokenizer.vocab_size=600",
        "pretrain.max_steps=6",
        "pretrain.batch_size=8",
        "pretrain.block_size=64",
        "pretrain.logging_steps=1",
        "sft.max_steps=6",
        "sft.batch_size=8",
        "sft.logging_steps=1",
        "sft.generation.num_prompts=8",
        "sft.generation.samples_per_prompt=2",
        "sft.generation.max_new_tokens=8",
        f"rm.data.train={small_data['rankings_train']}",
        f"rm.data.eval={small_data['rankings_eval']}",
        "rm.max_steps=6",
        "rm.batch_size=8",
        "rm.logging_steps=1",
        "ppo.iterations=4",
        "ppo.rollout_batch_size=8",
        "ppo.minibatch_size=4",
        "ppo.ppo_epochs=2",
        "ppo.max_new_tokens=8",
        "ppo.eval_prompts=6",
        "ppo.eval_samples_per_prompt=2",
        "ppo.ptx_batch_size=2",
        "ppo.ptx_block_size=32",
        "ppo.eval_corpus_blocks=4",
        "ppo.eval_steps=2",
        "ppo.save_steps=2",
        "ppo.table_steps=2",
    ]


@pytest.fixture
def make_config(small_data: dict[str, Path], tmp_path: Path) -> Callable[..., Config]:
    """A tiny-profile config on the small data slices, writing under tmp_path, with extra overrides."""

    def make(*overrides: str, run_dir: Path | None = None, profile: str = "tiny") -> Config:
        base = small_overrides(small_data, run_dir or tmp_path / "runs")
        return load_config(ROOT / "configs" / f"{profile}.yaml", [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, Path]) -> Path:
    """A small SFT model (pretrain and SFT for a few steps) that the RM and PPO tests start from."""
    from pipeline.stages import pretrain, sft

    run = tmp_path_factory.mktemp("chain")
    cfg = load_config("configs/tiny.yaml", [
        f"run_dir={run}", f"tokenizer.train_data={small_data['corpus_train']}", "tokenizer.vocab_size=600",
        f"pretrain.data.train={small_data['corpus_train']}", f"pretrain.data.eval={small_data['corpus_eval']}",
        f"sft.data.train={small_data['demos_train']}", f"sft.data.eval={small_data['demos_eval']}",
        "model.tiny.n_layer=2", "model.tiny.n_embd=64", "pretrain.block_size=64", "pretrain.max_steps=30",
        "pretrain.batch_size=8", "sft.max_steps=20", "sft.batch_size=16", "sft.generation.num_prompts=8",
        "sft.generation.samples_per_prompt=4", "sft.generation.max_new_tokens=8",
    ])
    pretrain.run(cfg)
    sft.run(cfg)
    return run / "sft"


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, Path], sft_dir: Path) -> Path:
    """A reward model trained for a few steps on the small SFT model."""
    from pipeline.stages import rm

    run = tmp_path_factory.mktemp("rm")
    rm.run(load_config("configs/tiny.yaml", [*small_overrides(small_data, run), f"rm.init={sft_dir}"]))
    return run / "rm"


@pytest.fixture(scope="session")
def small_pipeline(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, Path]) -> Config:
    """All four stages, small, in one run directory (what `make ppo` leaves behind), the PPO stage tracked by
    an offline W&B run: the report and tracking tests read it."""
    from pipeline.stages import ppo, pretrain, rm, sft

    run = tmp_path_factory.mktemp("pipeline")
    cfg = load_config("configs/tiny.yaml", small_overrides(small_data, run))
    for stage in (pretrain, sft, rm):
        stage.run(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        ppo.run(cfg)
    return cfg
