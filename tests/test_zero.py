"""DeepSpeed ZeRO through `accelerate launch`, on 2 CPU processes over gloo, against 1 process at the same
global batch.

Every stage runs as users run it: `accelerate launch --config_file configs/accelerate/<preset>.yaml -m pipeline
<stage>`, with `--num_processes 2 --mixed_precision no` (no GPU here; the presets say bf16). The 2-process run
takes half the per-process batch of the 1-process run, so both see the same global batches; dropout is off so
that splitting a batch over processes changes no random draw. What agrees, and how closely (AdamW, fp32):

- PPO (ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload): the same completions are sampled (seeds belong to places in
  the global batch), the same global minibatches are formed, token losses are divided by the global token
  count: losses agree to 1e-4 relative, held-out metrics to 1e-4, the saved policy to 1e-4 per weight.
  Measured: losses within 3e-5 relative, held-out metrics within 4e-7, weights within 1.2e-7.
- pretrain, sft, rm: training losses agree to 1e-4 relative (measured: 2e-7); the RM's held-out metrics to
  1e-4 (measured: 5e-6). The Trainer's held-out loss is a mean of per-batch means and a process's eval batch
  holds 4 rows instead of 8, so pretrain's agrees to 1e-3 (measured: 2.5e-4) and sft's to 1e-2 (measured:
  3e-3). SFT's sampled completions use per-process seeds, so its gold scores are not compared.

The run's summary records the backend it actually got (`distributed`), so each test asserts the DeepSpeed
config was not silently dropped, and how much of each model one rank holds (1/2 under ZeRO-3).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, run_group, small_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.config import load_config

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TIMEOUT = 420  # a hang (ranks making different numbers of collective calls) fails here instead of forever

# The same global batch for 1 and 2 processes: per-process sizes halve on 2.
ONE = ["pretrain.batch_size=8", "sft.batch_size=8", "rm.batch_size=8", "ppo.rollout_batch_size=8",
       "ppo.minibatch_size=4", "ppo.ptx_batch_size=2"]
TWO = ["pretrain.batch_size=4", "sft.batch_size=4", "rm.batch_size=4", "ppo.rollout_batch_size=4",
       "ppo.minibatch_size=2", "ppo.ptx_batch_size=1"]
COMMON = [
    "model.tiny.dropout=0", "rm.disable_dropout=true", "tracking.wandb=false",
    "pretrain.max_steps=20", "sft.max_steps=30",  # long enough to end some completions with EOS: rollouts of uneven length
    "ppo.iterations=3", "ppo.ppo_epochs=2", "ppo.generation_batch_size=4", "ppo.max_new_tokens=12",
    "ppo.eval_prompts=5", "ppo.eval_samples_per_prompt=1", "ppo.eval_batch_size=2",  # 3 chunks over 2 ranks
    "ppo.eval_corpus_blocks=3", "ppo.eval_steps=null", "ppo.save_steps=2",
]


# Held-out metrics: the RM's are per completion; the Trainer's held-out loss is a mean of per-batch means, and
# the batch boundaries move when a process's eval batch holds 4 rows instead of 8.
EVAL_REL = {"pretrain": 1e-3, "sft": 1e-2, "rm": 1e-4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(preset: str, stage: str, overrides: list[str], script: list[str] | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of a stage on 2 CPU processes under configs/accelerate/<preset>.yaml."""
    cmd = [ACCELERATE, "launch", "--config_file", f"configs/accelerate/{preset}.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           *(script or ["-m", "pipeline"]), stage, "--config", "configs/tiny.yaml", *overrides]
    return run_group(cmd, timeout=TIMEOUT, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def summary(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "summary.json").read_text())


def history(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage_dir / "log_history.jsonl").read_text().splitlines()]


def train_losses(stage_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in history(stage_dir) if key in r]


def assert_deepspeed(stage_dir: Path, zero_stage: int) -> dict[str, Any]:
    layout = summary(stage_dir)["distributed"]
    assert layout["type"] == "DEEPSPEED" and layout["processes"] == 2 and layout["zero_stage"] == zero_stage, layout
    return layout


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, Path]) -> dict[str, Any]:
    """pretrain → sft → rm → ppo on 1 process (the reference every 2-process run is compared with)."""
    from pipeline.stages import ppo, pretrain, rm, sft

    run = tmp_path_factory.mktemp("one")
    overrides = [*small_overrides(small_data, run), *COMMON, *ONE]
    cfg = load_config("configs/tiny.yaml", overrides)
    for stage in (pretrain, sft, rm, ppo):
        stage.run(cfg)
    return {"run": run, "overrides": overrides}


def two_process_overrides(chain: dict[str, Any], run_dir: Path, *extra: str) -> list[str]:
    """The 1-process overrides with half the per-process batch, a new run_dir, and the 1-process models as
    every stage's input (so each stage is compared on its own)."""
    run = chain["run"]
    return [*chain["overrides"], *TWO, f"run_dir={run_dir}", f"sft.init={run / 'pretrain'}", f"rm.init={run / 'sft'}",
            f"ppo.init={run / 'sft'}", f"ppo.reward_model={run / 'rm'}", *extra]


def assert_ppo_matches(one: Path, two: Path) -> None:
    h1 = {r["train/global_step"]: r for r in history(one) if "ppo/loss" in r}
    h2 = {r["train/global_step"]: r for r in history(two) if "ppo/loss" in r}
    assert sorted(h1) == sorted(h2) == [1, 2, 3]
    for step in h1:
        # the same completions, scored the same: sampling did not depend on the process count
        assert h2[step]["ppo/score"] == pytest.approx(h1[step]["ppo/score"], rel=1e-4, abs=1e-6), step
        for key in ("ppo/loss", "ppo/policy_loss", "ppo/value_loss", "ppo/ptx_loss", "ppo/kl"):
            assert h2[step][key] == pytest.approx(h1[step][key], rel=1e-4, abs=1e-5), (step, key)
    m1, m2 = summary(one)["metrics"], summary(two)["metrics"]
    for key in ("eval/score", "eval/kl", "eval/gold_score", "eval/corpus_loss", "eval/completion_length"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-5), key
    # every held-out sample exactly once, although 3 evaluation chunks do not split evenly over 2 ranks
    assert len((two / "samples.jsonl").read_text().splitlines()) == 5
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


def test_ppo_under_zero3_on_two_processes_matches_one_process(chain: dict[str, Any], tmp_path: Path) -> None:
    """ZeRO-3 with the policy left sharded during generation: every decoding step is then a collective, and
    the completions of the two ranks end at different lengths (transformers keeps the finished rank stepping);
    the evaluation has 3 chunks for 2 ranks. It finishes, and agrees with 1 process."""
    proc = launch("zero3", "ppo", two_process_overrides(chain, tmp_path, "ppo.gather_for_generation=false"))
    _ok(proc)
    two = tmp_path / "ppo"
    layout = assert_deepspeed(two, zero_stage=3)
    # each rank holds half of every model: the trained policy + value, and the frozen reference and RM
    for name in ("trained", "reference", "reward_model"):
        assert layout["local_fraction"][name] == pytest.approx(0.5, abs=0.01), (name, layout)
    lengths = {json.loads(line)["num_tokens"] for line in (two / "samples.jsonl").read_text().splitlines()}
    assert len(lengths) > 1, "completions of equal length do not exercise the uneven-length case"
    assert_ppo_matches(chain["run"] / "ppo", two)
    # a plain Hugging Face directory: the consolidated (gathered) weights load without DeepSpeed
    policy = AutoModelForCausalLM.from_pretrained(two)
    reference = AutoModelForCausalLM.from_pretrained(chain["run"] / "ppo")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(policy(ids).logits, reference(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_lora_ppo_under_zero3_on_two_processes_matches_one_process(chain: dict[str, Any], tmp_path: Path) -> None:
    """PPO with LoRA (one base: policy and value adapters, the LoRA reward model a frozen adapter, the reference the
    base with adapters off), the one module sharded by ZeRO-3 over 2 processes, against 1 process."""
    from pipeline.stages import ppo, rm

    lora = ["rm.lora.r=8", "rm.lr=2e-3", "ppo.lora.r=8", "ppo.lr=5e-4"]
    one = tmp_path / "one"
    cfg = load_config("configs/tiny.yaml", [*chain["overrides"], f"run_dir={one}", f"rm.init={chain['run'] / 'sft'}",
                                            f"ppo.init={chain['run'] / 'sft'}", *lora])
    rm.run(cfg)  # a LoRA reward model of the chain's SFT model
    ppo.run(cfg)
    proc = launch("zero3", "ppo", two_process_overrides(chain, tmp_path / "two", *lora,
                                                        f"ppo.reward_model={one / 'rm'}"))
    _ok(proc)
    two = tmp_path / "two" / "ppo"
    layout = assert_deepspeed(two, zero_stage=3)
    assert layout["lora"] == {"shared_base": True, "reward_model": "adapter", "quantized": None}, layout
    assert layout["local_fraction"]["trained"] == pytest.approx(0.5, abs=0.01), layout
    assert_ppo_matches(one / "ppo", two)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zero2", "zero3_offload"])
def test_ppo_under_zero2_and_zero3_offload_matches_one_process(
    chain: dict[str, Any], tmp_path: Path, preset: str
) -> None:
    proc = launch(preset, "ppo", two_process_overrides(chain, tmp_path))
    _ok(proc)
    layout = assert_deepspeed(tmp_path / "ppo", zero_stage=2 if preset == "zero2" else 3)
    if preset == "zero2":  # ZeRO-2 shards optimizer states and gradients only; frozen models are replicated
        assert layout["local_fraction"]["reference"] == 1.0
    assert_ppo_matches(chain["run"] / "ppo", tmp_path / "ppo")


@pytest.mark.slow
def test_interrupted_zero3_ppo_resumes_and_matches_the_uninterrupted_run(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    overrides = two_process_overrides(chain, tmp_path)
    # interrupted at iteration index 2, after checkpoint-2 (DeepSpeed shards of every rank) was written
    proc = launch("zero3", "ppo", overrides, script=[str(ROOT / "tests" / "interrupt_ppo.py")],
                  env={"STOP_AT_ITERATION": "2"})
    assert proc.returncode != 0 and "interrupted" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ppo").exists()
    checkpoint = tmp_path / "ppo.partial" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "ppo_state.json").is_file() and (checkpoint / "pytorch_model").is_dir()

    _ok(launch("zero3", "ppo", overrides))
    assert summary(tmp_path / "ppo")["resumed_from"].endswith("checkpoint-2")
    assert_ppo_matches(chain["run"] / "ppo", tmp_path / "ppo")


@pytest.mark.slow  # make test keeps the ZeRO-3 PPO test; the Trainer stages under ZeRO-3 run in make test-all
@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm"])
def test_trainer_stages_under_zero3_on_two_processes_match_one_process(
    chain: dict[str, Any], tmp_path: Path, stage: str
) -> None:
    _ok(launch("zero3", stage, two_process_overrides(chain, tmp_path)))
    one, two = chain["run"] / stage, tmp_path / stage
    layout = assert_deepspeed(two, zero_stage=3)
    assert layout["local_fraction"]["model"] == pytest.approx(0.5, abs=0.01)
    rel = 1e-4
    l1, l2 = train_losses(one), train_losses(two)
    assert len(l1) == len(l2) >= 6
    assert l2[:3] == pytest.approx(l1[:3], rel=rel)  # the first steps
    assert l2[-1] == pytest.approx(l1[-1], rel=rel)
    m1, m2 = summary(one)["metrics"], summary(two)["metrics"]
    keys = {"pretrain": ["eval/loss"], "sft": ["eval/loss", "eval/loss_init"],
            "rm": ["eval/pairwise_acc", "eval/loss", "eval/reward_mean", "eval/gold_agreement"]}[stage]
    for key in keys:
        assert m2[key] == pytest.approx(m1[key], rel=EVAL_REL[stage], abs=1e-6), key
    # the gathered 16-bit (here fp32) consolidated weights load as a plain Hugging Face model
    loader = AutoModelForCausalLM
    if stage == "rm":
        from transformers import AutoModelForSequenceClassification as loader
    assert loader.from_pretrained(two).num_parameters() > 0


@pytest.mark.parametrize("stage", ["pretrain", "ppo"])
def test_a_preset_that_contradicts_the_stage_config_fails_with_one_clear_error(
    chain: dict[str, Any], tmp_path: Path, stage: str
) -> None:
    """Clipping comes from `<stage>.max_grad_norm`; a preset that hard-codes another value must not win
    silently (nor lose silently): the stage stops before training and names both."""
    preset = ROOT / "configs" / "accelerate" / "zero3.yaml"
    bad = tmp_path / "zero3_clip.yaml"
    bad.write_text(preset.read_text().replace("  zero_stage: 3\n", "  zero_stage: 3\n  gradient_clipping: 0.5\n"))
    cmd = [ACCELERATE, "launch", "--config_file", str(bad), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(_free_port()), "-m", "pipeline", stage, "--config", "configs/tiny.yaml",
           *two_process_overrides(chain, tmp_path / "runs")]
    proc = run_group(cmd, timeout=TIMEOUT, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode != 0
    assert f"'gradient_clipping: 0.5' but '{stage}.max_grad_norm' is 1.0" in proc.stderr, proc.stderr[-3000:]
    # no stack trace from the ranks (accelerate's launcher still reports the failed children in its own words)
    assert "[rank0]: Traceback" not in proc.stderr and "/pipeline/" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs" / stage).exists()
