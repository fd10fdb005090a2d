"""No secret in outputs: with WANDB_API_KEY and HF_TOKEN set, neither value appears in any file a stage, the W&B
run (offline, so its files are local), TensorBoard or the report writes, nor in what the commands print."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, small_overrides

SECRETS = {"WANDB_API_KEY": "wandbkey" + "0123456789abcdef" * 2 + "77", "HF_TOKEN": "hf_SeCrEtToKeNfortest9876543210"}


def test_tokens_in_the_environment_reach_no_file_and_no_output(small_data: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "runs"
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1"}
    overrides = [*small_overrides(small_data, run), "tracking.tensorboard=true", "pretrain.save_steps=3"]
    printed = []
    for command in (["pretrain"], ["sft"], ["report"], ["summary"], ["config"], ["env"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline", *command, "--config", "configs/tiny.yaml", *overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed.append(proc.stdout + proc.stderr)
    files = [f for f in run.rglob("*") if f.is_file()]
    # the places a leak would be: the saved configs and summary.json, W&B's logs and its run file (offline, the
    # W&B config is a record in run-*.wandb), TensorBoard's events, the report
    names = {f.name for f in files}
    assert {"summary.json", "config.json", "log_history.jsonl", "debug.log", "output.log", "index.html"} <= names
    assert any(f.name.startswith("events.out.tfevents") for f in files)
    runs = [f for f in files if f.suffix == ".wandb"]
    assert len(runs) == 2 and all(b"block_size" in f.read_bytes() for f in runs)  # the W&B config is in there
    for name, value in SECRETS.items():
        leaked = [str(f) for f in files if value.encode() in f.read_bytes()]
        assert not leaked, f"{name} found in {leaked}"
        assert all(value not in out for out in printed), f"{name} printed"
