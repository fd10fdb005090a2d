"""The non-finite guard (pipeline/guards.py): a NaN injected into sft, rm and ppo stops the stage with one line
and exit status 2 before the bad update, and the newest checkpoint is the last good one; nan_policy=skip
drops the update and counts it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from trl import SFTTrainer

from pipeline import guards, rlhf
from pipeline.__main__ import main
from pipeline.config import Config
from pipeline.stages import ppo
from tests.conftest import ROOT, run_group, small_overrides

BAD_STEP = 4  # the optimizer step (or PPO iteration) whose update carries the NaN; checkpoints every 2 steps


def _cli(small_data: dict[str, Path], run_dir: Path, stage: str, *extra: str) -> list[str]:
    return [stage, "--config", "configs/tiny.yaml", *small_overrides(small_data, run_dir), *extra]


def _checkpoints(run_dir: Path, stage: str) -> list[str]:
    d = run_dir / f"{stage}.partial" / "checkpoints"
    return sorted((c.name for c in d.iterdir() if c.name.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def _all_finite(checkpoint: Path) -> bool:
    files = sorted(checkpoint.rglob("*.safetensors"))
    assert files, f"no weights in {checkpoint}"
    return all(bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values())


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_nan_loss_in_sft_stops_before_the_update_and_keeps_the_last_good_checkpoint(
    small_data: dict[str, Path], sft_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = SFTTrainer.compute_loss
    seen_steps: list[int] = []

    def poisoned(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = real(self, model, inputs, *args, **kwargs)
        if torch.is_grad_enabled():
            seen_steps.append(self.state.global_step + 1)
            if self.state.global_step + 1 == BAD_STEP:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    run = tmp_path / "runs"
    code = main(_cli(small_data, run, "sft", f"sft.init={sft_dir}", "sft.save_steps=2"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: sft: non-finite loss at step {BAD_STEP}; the update was not applied; "
                           "last good checkpoint checkpoint-2 kept"), line
    assert "sft.lr" in line
    assert seen_steps[-1] == BAD_STEP  # it stopped at once: no later step ran
    assert _checkpoints(run, "sft") == ["checkpoint-2"]
    assert _all_finite(run / "sft.partial" / "checkpoints" / "checkpoint-2")
    assert not (run / "sft").exists()


def test_nan_gradient_in_sft_is_caught_before_optimizer_step(
    small_data: dict[str, Path], sft_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A finite loss whose gradient is NaN: d/dw sqrt(0 · Σw) = 0.5 / sqrt(0) · 0 = inf · 0 = NaN.
    real = SFTTrainer.compute_loss

    def poisoned(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = real(self, model, inputs, *args, **kwargs)
        if torch.is_grad_enabled() and self.state.global_step + 1 == BAD_STEP:
            w = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + torch.sqrt(0.0 * w.sum())
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    run = tmp_path / "runs"
    assert main(_cli(small_data, run, "sft", f"sft.init={sft_dir}", "sft.save_steps=2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: sft: non-finite gradient norm at step {BAD_STEP}"), line
    assert _checkpoints(run, "sft") == ["checkpoint-2"]


def test_nan_loss_in_sft_with_nan_policy_skip_leaves_out_that_step(
    make_config: Callable[..., Config], sft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.stages import sft

    real = SFTTrainer.compute_loss
    params_at: dict[int, list[torch.Tensor]] = {}

    def poisoned(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = real(self, model, inputs, *args, **kwargs)
        step = self.state.global_step + 1
        if torch.is_grad_enabled():
            params_at[step] = [p.detach().clone() for p in model.parameters()]
            if step == BAD_STEP:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    metrics = sft.run(make_config(f"sft.init={sft_dir}", "sft.nan_policy=skip"))
    assert metrics["train/skipped_nonfinite"] == 1
    assert metrics["train/global_step"] == 6
    # the skipped step changed no weight: the parameters before step 5 are those before step 4
    assert all(torch.equal(a, b) for a, b in zip(params_at[BAD_STEP], params_at[BAD_STEP + 1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(params_at[2], params_at[3], strict=True))
    assert all(bool(torch.isfinite(p).all()) for p in params_at[6])


def test_nan_loss_in_rm_stops_with_the_last_good_checkpoint(
    small_data: dict[str, Path], sft_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = rlhf.ranking_loss
    calls = []

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        if not loss.requires_grad:  # the held-out metrics (pipeline/ranking.py) on detached rewards
            return loss
        calls.append(1)  # one call per optimizer step (rm.grad_accum = 1)
        return loss * float("nan") if len(calls) == BAD_STEP else loss

    monkeypatch.setattr(rlhf, "ranking_loss", poisoned)
    run = tmp_path / "runs"
    assert main(_cli(small_data, run, "rm", f"rm.init={sft_dir}", "rm.save_steps=2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: rm: non-finite loss at step {BAD_STEP}; the update was not applied; "
                           "last good checkpoint checkpoint-2 kept"), line
    assert len(calls) == BAD_STEP
    assert _checkpoints(run, "rm") == ["checkpoint-2"]
    assert _all_finite(run / "rm.partial" / "checkpoints" / "checkpoint-2")
    assert not (run / "rm").exists()


def _poison_scores(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """The reward model scores one completion of PPO iteration `iteration` (1-based) NaN."""
    real = ppo.sample_batch

    def poisoned(models: Any, batch: Any, p: Any, gold: Any, seed: int, index: int) -> Any:
        rollout = real(models, batch, p, gold, seed, index)
        if index + 1 == iteration:
            rollout.scores[0] = float("nan")
        return rollout

    monkeypatch.setattr(ppo, "sample_batch", poisoned)


def test_poisoned_reward_in_ppo_stops_before_the_update(
    small_data: dict[str, Path], sft_dir: Path, rm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _poison_scores(monkeypatch, BAD_STEP - 1)  # iteration 3: checkpoint-2 exists, checkpoint-4 never will
    updates: list[int] = []
    real_update = ppo.ppo_update

    def counted(*args: Any, **kwargs: Any) -> Any:
        updates.append(args[-1] + 1)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", counted)
    run = tmp_path / "runs"
    code = main(_cli(small_data, run, "ppo", f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: ppo: non-finite reward at iteration {BAD_STEP - 1}; the update was not "
                           "applied; last good checkpoint checkpoint-2 kept"), line
    assert "make rm" in line
    assert updates == [1, 2]  # iteration 3's update never ran
    assert _checkpoints(run, "ppo") == ["checkpoint-2"]
    assert _all_finite(run / "ppo.partial" / "checkpoints" / "checkpoint-2")
    assert not (run / "ppo").exists()


def test_nan_value_loss_in_ppo_names_the_quantity_and_the_keys_to_try(
    make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = rlhf.value_loss
    calls = []

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)  # 2 epochs × 2 minibatches = 4 optimizer steps per iteration
        loss, clip = real(*args, **kwargs)
        return (loss * float("inf"), clip) if len(calls) == 6 else (loss, clip)  # iteration 2, step 2

    monkeypatch.setattr(rlhf, "value_loss", poisoned)
    with pytest.raises(guards.NonFiniteError, match=r"^ppo: non-finite value loss at iteration 2; .* no checkpoint "
                       r"was written yet .*; try a lower ppo\.lr or ppo\.vf_coef$"):
        ppo.run(make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}"))


def test_poisoned_reward_in_ppo_with_nan_policy_skip_drops_that_rollout(
    make_config: Callable[..., Config], sft_dir: Path, rm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_scores(monkeypatch, 3)
    cfg = make_config(f"ppo.init={sft_dir}", f"ppo.reward_model={rm_dir}", "ppo.nan_policy=skip")
    metrics = ppo.run(cfg)
    assert metrics["ppo/skipped_nonfinite"] == 1
    summary = json.loads((Path(cfg.run_dir) / "ppo" / "summary.json").read_text())
    assert summary["metrics"]["ppo/skipped_nonfinite"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["metrics"].values() if isinstance(v, float))


def test_nonfinite_names_each_bad_quantity() -> None:
    bad = guards.nonfinite({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0, float("nan")]), "c": None,
                            "d": float("-inf"), "e": 3.0})
    assert bad == ["b", "d"]


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(small_data: dict[str, Path], tmp_path: Path) -> None:
    """torchrun, 2 processes (gloo): rank 1 alone sees a NaN loss at step 4. The flag is summed over processes,
    so rank 0 stops there too instead of waiting forever in the gradient all-reduce rank 1 never joins."""
    import os
    import sys

    run = tmp_path / "runs"
    overrides = [*small_overrides(small_data, run), "model.tiny.n_layer=1", "model.tiny.n_embd=32",
                 "model.tiny.n_head=2", "pretrain.batch_size=4", "pretrain.save_steps=2"]
    # PYTHONPATH: a script's sys.path starts at its own folder; the pipeline imported must be this checkout's.
    env = {**os.environ, "NAN_AT_STEP": str(BAD_STEP), "NAN_ON_RANK": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    proc = run_group([*launcher, str(ROOT / "tests" / "nan_on_one_rank.py"), "pretrain", "--config", "configs/tiny.yaml",
                      *overrides], timeout=300, env=env)
    assert proc.returncode != 0
    # One line from each rank, the same one (a progress bar's \r may precede it on the terminal line).
    line = (f"error: pretrain: non-finite loss at step {BAD_STEP}; the update was not applied; last good checkpoint "
            "checkpoint-2 kept")
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert _checkpoints(run, "pretrain") == ["checkpoint-2"]
    assert _all_finite(run / "pretrain.partial" / "checkpoints" / "checkpoint-2")
