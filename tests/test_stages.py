"""Stage behaviour on second-scale runs: outputs load in the next stage, interrupted runs resume exactly,
bad input fails before anything is written, and the gpt2 profile's from_pretrained path works."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from pipeline.__main__ import main
from pipeline.config import Config, ConfigError
from pipeline.modeling import CHAT_TEMPLATE, build_tiny_model, build_tiny_tokenizer
from pipeline.stages import pretrain, sft
from tests.conftest import run_group


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretrain_then_sft_outputs_load_and_generate(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    pretrain.run(cfg)
    sft.run(cfg)
    out = cfg.stage_dir("sft")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["seed"] == 0
    assert summary["config"]["sft"]["max_steps"] == 6  # the resolved config, overrides applied
    assert {"torch", "transformers", "trl"} <= set(summary["versions"])
    for key in ("eval/loss", "eval/loss_init", "eval/gold_score", "eval/gold_score_init", "eval/eos_rate"):
        assert key in summary["metrics"], key
    assert summary["wall_time_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer("count to three\n", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(gen[0]), str)
    assert not (out.parent / "sft.partial").exists() and not (out.parent / "pretrain.partial").exists()


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class Interrupt(TrainerCallback):
    """Simulates Ctrl-C / a preempted job at a given optimizer step."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_interrupted_stage_leaves_nothing_finished_and_resumes_exactly(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    overrides = ("pretrain.max_steps=8", "pretrain.save_steps=4", "pretrain.data.eval=null")
    reference = make_config(*overrides, run_dir=tmp_path / "uninterrupted")
    pretrain.run(reference)

    cfg = make_config(*overrides, run_dir=tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg, callbacks=[Interrupt(at_step=6)])
    final = cfg.stage_dir("pretrain")
    assert not final.exists(), "an interrupted stage must not leave an output a later stage could take as finished"
    assert (final.parent / "pretrain.partial" / "checkpoints" / "checkpoint-4").is_dir()
    # The next stage refuses to start from it, and says which target builds it.
    assert main(["sft", "--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'interrupted'}"]) == 2

    counter = CountSteps()
    pretrain.run(cfg, callbacks=[counter])  # run again: resumes from checkpoint-4
    assert counter.steps == [5, 6, 7, 8], "the rerun must continue after the checkpoint, not start over"
    summary = json.loads((final / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert not (final.parent / "pretrain.partial").exists()
    resumed, uninterrupted = losses(final), losses(reference.stage_dir("pretrain"))
    assert set(resumed) >= {5, 6, 7, 8}
    for step in (5, 6, 7, 8):  # same data order, RNG and optimizer state as the uninterrupted run
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4), step


def test_resume_with_a_changed_config_is_refused(make_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_config("pretrain.max_steps=8", "pretrain.save_steps=4", run_dir=tmp_path / "r")
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg, callbacks=[Interrupt(at_step=5)])
    changed = make_config("pretrain.max_steps=8", "pretrain.save_steps=4", "pretrain.lr=1e-5", run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match=r"different config \(changed: pretrain\.lr\)"):
        pretrain.run(changed)


def test_bad_demonstration_fails_before_anything_is_written(
    small_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "count to two\\n", "completion": "one two"}\n{"prompt": "list two fruits\\n"}\n')
    runs = tmp_path / "runs"
    code = main(["sft", "--config", "configs/tiny.yaml", f"run_dir={runs}", f"sft.data.train={bad}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "demos.jsonl" in err and "row 2" in err and "completion" in err
    assert "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir())


def test_missing_previous_stage_names_the_make_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sft", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}"])
    assert code == 2
    assert "make pretrain PROFILE=tiny" in capsys.readouterr().err


def gpt2_like_directory(path: Path, small_data: dict[str, Path]) -> Path:
    """A local directory in the format of the hub's `gpt2`: no pad token, no chat template."""
    from pipeline.config import load_config

    cfg = load_config(
        "configs/tiny.yaml",
        [f"tokenizer.train_data={small_data['corpus_train']}", "tokenizer.vocab_size=600",
         "model.tiny.n_layer=1", "model.tiny.n_embd=32", "model.tiny.n_head=2"],
    )
    tokenizer = build_tiny_tokenizer(cfg.tokenizer)
    model = build_tiny_model(cfg.model, tokenizer)
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_gpt2_profile_loads_a_local_directory_through_from_pretrained(
    make_config: Callable[..., Config], small_data: dict[str, Path], tmp_path: Path
) -> None:
    local = gpt2_like_directory(tmp_path / "gpt2-local", small_data)
    cfg = make_config(f"model.name_or_path={local}", "pretrain.block_size=64", "sft.max_length=64",
                      "pretrain.max_steps=2", "sft.max_steps=2", profile="gpt2")
    assert cfg.profile == "gpt2" and cfg.model.name_or_path == str(local)
    pretrain.run(cfg)
    out = cfg.stage_dir("pretrain")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token  # GPT-2 has no pad token: EOS stands in
    assert tokenizer.chat_template == CHAT_TEMPLATE
    sft.run(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft"))
    assert model.config.n_embd == 32
    assert torch.isfinite(torch.tensor(json.loads((cfg.stage_dir("sft") / "summary.json").read_text())
                                       ["metrics"]["eval/loss"]))


def test_interrupted_sft_resumes_and_keeps_the_baseline_of_the_starting_model(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = make_config("sft.max_steps=6", "sft.save_steps=3", run_dir=tmp_path / "r")
    pretrain.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, callbacks=[Interrupt(at_step=4)])
    work = cfg.stage_dir("sft").with_name("sft.partial")
    assert not cfg.stage_dir("sft").exists()
    baseline = json.loads((work / "baseline.json").read_text())
    assert "eval/loss" in baseline and "eval/gold_score" in baseline

    counter = CountSteps()
    sft.run(cfg, callbacks=[counter])
    assert counter.steps == [4, 5, 6]
    metrics = json.loads((cfg.stage_dir("sft") / "summary.json").read_text())["metrics"]
    # The "before SFT" numbers are the starting model's, measured before the interruption, not the
    # half-trained model the resumed run loaded.
    assert metrics["eval/loss_init"] == baseline["eval/loss"]
    assert not work.exists()


def test_two_processes_shard_the_data_gather_the_eval_and_write_once(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    """`torchrun --nproc_per_node 2` on the CPU: the same code path as N GPUs under `accelerate launch`."""
    import sys

    run = tmp_path / "runs"
    overrides = [
        f"run_dir={run}", f"tokenizer.train_data={small_data['corpus_train']}", "tokenizer.vocab_size=600",
        f"pretrain.data.train={small_data['corpus_train']}", f"pretrain.data.eval={small_data['corpus_eval']}",
        f"sft.data.train={small_data['demos_train']}", f"sft.data.eval={small_data['demos_eval']}",
        "model.tiny.n_layer=1", "model.tiny.n_embd=32", "model.tiny.n_head=2", "pretrain.block_size=64",
        "pretrain.max_steps=4", "pretrain.batch_size=4", "sft.max_steps=4", "sft.batch_size=4",
        "sft.generation.num_prompts=6", "sft.generation.samples_per_prompt=2", "sft.generation.max_new_tokens=6",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    for stage in ("pretrain", "sft"):
        proc = run_group([*launcher, "-m", "pipeline", stage, "--config", "configs/tiny.yaml", *overrides],
                         timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "sft" / "summary.json").read_text())
    log = [json.loads(line) for line in (run / "pretrain" / "log_history.jsonl").read_text().splitlines()]
    blocks = json.loads((run / "pretrain" / "summary.json").read_text())["train_blocks"]
    # 4 steps x 4 blocks x 2 processes: each process saw its own shard.
    assert log[-1]["epoch"] == pytest.approx(4 * 4 * 2 / blocks, rel=0.01)
    # Every process sampled its share of the 6 distinct held-out prompts; the main process wrote them all.
    samples = (run / "sft" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6 * 2
    assert len({json.loads(s)["prompt"] for s in samples}) == 6
    assert 0.0 <= summary["metrics"]["eval/gold_score"] <= 1.0
    assert not (run / "sft.partial").exists()


def test_rerun_replaces_a_finished_output_and_clears_a_half_written_one(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    first = make_config("pretrain.max_steps=2", run_dir=tmp_path / "r")
    pretrain.run(first)
    # A previous attempt that died while writing its final directory left junk in the staging area.
    junk = first.stage_dir("pretrain").with_name("pretrain.partial") / "final" / "stale-shard.safetensors"
    junk.parent.mkdir(parents=True)
    junk.write_text("half-written")
    second = make_config("pretrain.max_steps=3", run_dir=tmp_path / "r")
    pretrain.run(second)
    out = second.stage_dir("pretrain")
    assert json.loads((out / "summary.json").read_text())["metrics"]["train/global_step"] == 3
    assert not (out / junk.name).exists()  # the staging area was cleared before the new output was written
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert sorted(p.name for p in out.parent.iterdir()) == ["pretrain"]  # no .partial, no .old


def test_block_size_beyond_the_model_context_is_a_config_error(make_config: Callable[..., Config]) -> None:
    cfg = make_config("pretrain.block_size=512")  # the tiny model has 256 positions
    with pytest.raises(ConfigError, match=r"'pretrain\.block_size' \(512\) exceeds the model's context \(256\)"):
        pretrain.run(cfg)
    assert not cfg.stage_dir("pretrain").with_name("pretrain.partial").exists()


def test_gold_reward_that_cannot_score_the_eval_prompts_fails_before_training(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "What is the capital of France?\\n", "completion": "Paris"}\n')
    cfg = make_config(f"sft.data.eval={other}", run_dir=tmp_path / "r")
    pretrain.run(cfg)
    with pytest.raises(ConfigError, match=r"'gold_reward' cannot score the prompt 'What is the capital.*gold_reward: null"):
        sft.run(cfg)
    assert not (tmp_path / "r" / "sft.partial").exists() and not (tmp_path / "r" / "sft").exists()
    sft.run(make_config(f"sft.data.eval={other}", "gold_reward=null", run_dir=tmp_path / "r"))  # real data: no gold
    metrics = json.loads((tmp_path / "r" / "sft" / "summary.json").read_text())["metrics"]
    assert "eval/gold_score" not in metrics and "eval/eos_rate" in metrics


def test_a_timed_out_launch_leaves_no_process_behind(tmp_path: Path) -> None:
    """The multi-process tests run their launcher with `run_group`: on a timeout the ranks the launcher started
    are killed with it (subprocess.run would kill the launcher alone, and orphaned ranks slow every later test)."""
    import subprocess

    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=2)
    child = int(pid_file.read_text())
    for _ in range(50):  # killed with its group, then reaped by init
        try:
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the launcher's child {child} outlived the timeout")


def test_packed_sft_trains_and_its_held_out_loss_is_the_unpacked_one(
    make_config: Callable[..., Config], sft_dir: Path, tmp_path: Path
) -> None:
    """sft.packing=true through the stage: the packed run trains (held-out loss falls from the starting model's),
    and its held-out loss is measured on the same unpacked demonstrations as an unpacked run's."""
    init = f"sft.init={sft_dir.parent / 'pretrain'}"
    losses = {}
    for packing in (True, False):
        cfg = make_config(init, f"sft.packing={str(packing).lower()}", "sft.max_steps=8", "sft.lr=2e-3",
                          run_dir=tmp_path / str(packing))
        sft.run(cfg)
        summary = json.loads((cfg.stage_dir("sft") / "summary.json").read_text())
        assert summary["config"]["sft"]["packing"] is packing
        losses[packing] = summary["metrics"]
        if packing:
            assert AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft")) is not None
            # The logged token count is every packed row's tokens (TRL alone would log one row's width per step).
            logged = [json.loads(line) for line in (cfg.stage_dir("sft") / "log_history.jsonl").read_text().splitlines()]
            last = [r for r in logged if "num_tokens" in r][-1]
            assert last["num_tokens"] > last["step"] * 2 * cfg.sft.max_length
    packed, unpacked = losses[True], losses[False]
    assert packed["eval/loss"] < packed["eval/loss_init"] - 0.1
    assert abs(packed["eval/loss_init"] - unpacked["eval/loss_init"]) < 1e-3  # the same starting model, same rows
