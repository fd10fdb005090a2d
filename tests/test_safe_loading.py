"""Safe loading: no pickle is ever executed, no model code runs unless the profile says so, weights are
safetensors. Each proof uses a payload that would write a file if it ran, and checks the file is not there."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from pipeline.__main__ import main
from pipeline.modeling import ModelLoadError, load_causal_lm, load_reward_model, load_stage_model


class _Payload:
    """Unpickling this runs `exec(code)`: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self) -> tuple:
        return (exec, (self.code,))


def _malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"transformer.wte.weight": _Payload(marker)}))
    return path


def test_the_payload_is_live(tmp_path: Path) -> None:
    # The proof below means something only if the file really runs code when unpickled.
    marker = tmp_path / "ran"
    pickle.loads(_malicious_pickle(tmp_path / "x.bin", marker).read_bytes())
    assert marker.read_text() == "pwned"


def _pickled_only_copy(sft_dir: Path, dst: Path, marker: Path) -> Path:
    """`sft_dir` with its safetensors weights replaced by a malicious pytorch_model.bin."""
    shutil.copytree(sft_dir, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    _malicious_pickle(dst / "pytorch_model.bin", marker)
    return dst


def test_a_directory_with_only_a_pickled_pytorch_model_bin_is_refused_unexecuted(
    sft_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    bad = _pickled_only_copy(sft_dir, tmp_path / "pickled", marker)
    for load in (load_stage_model, load_reward_model, load_causal_lm):
        with pytest.raises(ModelLoadError, match=r"holds only pickled weights \(pytorch_model\.bin\).*safetensors only"):
            load(str(bad))
    assert not marker.exists()


def test_cli_refuses_a_pickled_previous_stage_in_one_line(
    sft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    bad = _pickled_only_copy(sft_dir, tmp_path / "pickled", marker)
    code = main(["rm", "--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'runs'}", f"rm.init={bad}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: {bad} holds only pickled weights")
    assert "Traceback" not in err and not marker.exists() and not (tmp_path / "runs").exists()


def test_stage_outputs_and_checkpoints_hold_safetensors_weights(sft_dir: Path) -> None:
    assert (sft_dir / "model.safetensors").is_file()
    assert not list(sft_dir.glob("*.bin")) and not list(sft_dir.glob("*.pt"))


def test_accelerate_load_state_does_not_execute_a_pickled_optimizer_state(tmp_path: Path) -> None:
    # PPO resumes with `accelerator.load_state`; accelerate loads optimizer, scheduler and RNG files with
    # torch.load(weights_only=True) (accelerate.utils.other.load), which refuses anything but tensors and
    # plain containers. A tampered optimizer.bin must fail to load without running.
    marker = tmp_path / "ran"
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    _malicious_pickle(tmp_path / "ckpt" / "optimizer.bin", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert not marker.exists()


def _remote_code_model(sft_dir: Path, dst: Path, marker: Path) -> Path:
    """`sft_dir` as a model whose config names custom code (auto_map) that writes `marker` when imported."""
    shutil.copytree(sft_dir, dst)
    (dst / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import GPT2Config\n\n\n"
        "class CustomConfig(GPT2Config):\n    model_type = 'custom_gpt2'\n"
    )
    (dst / "modeling_custom.py").write_text(
        "from transformers import GPT2LMHeadModel\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomLM(GPT2LMHeadModel):\n    config_class = CustomConfig\n"
    )
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="custom_gpt2", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_remote_code_runs_only_with_model_trust_remote_code(
    sft_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "ran"
    custom = _remote_code_model(sft_dir, tmp_path / "custom", marker)
    with pytest.raises(ModelLoadError, match=r"contains custom code.*model\.trust_remote_code: true"):
        load_stage_model(custom)
    assert not marker.exists()
    with caplog.at_level(logging.WARNING, logger="pipeline.modeling"):
        model, _ = load_stage_model(custom, trust_remote_code=True)
    assert type(model).__name__ == "CustomLM" and marker.exists()
    assert f"model.trust_remote_code is on: Python code shipped with '{custom}' may run" in caplog.text


def test_deepspeed_checkpoints_load_weights_only(tmp_path: Path) -> None:
    # Under ZeRO both the Trainer and PPO resume through DeepSpeed's TorchCheckpointEngine, which unpickles with
    # weights_only=False; pipeline/safeload.py (applied by the CLI under DeepSpeed) makes it weights-only.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.safeload import weights_only_deepspeed_checkpoints

    marker = tmp_path / "ran"
    # what ZeRO writes in zero_pp_rank_*_optim_states.pt (the classes a real ZeRO-3 checkpoint needed)
    real = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                                         "fp32_flat_groups": [torch.ones(3)]}, "ds_version": "0.19"}, real)
    tampered = _malicious_pickle(tmp_path / "tampered.pt", marker)
    original = TorchCheckpointEngine.load
    try:
        weights_only_deepspeed_checkpoints()
        engine = TorchCheckpointEngine()
        state = engine.load(str(real))
        assert state["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.weights
        assert state["optimizer_state_dict"]["loss_scaler"].cur_scale == 1.0
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            engine.load(str(tampered))
        assert not marker.exists()
    finally:
        TorchCheckpointEngine.load = original
