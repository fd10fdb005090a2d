"""Every shipped YAML loads and says what it promises: the profiles in configs/ and the `accelerate launch`
presets in configs/accelerate/.

Both directories are enumerated with glob, so a YAML added to either is tested without touching this file;
an accelerate preset whose name this file cannot map to an expected setup fails until it is described in
`expected_preset` below. No process is launched: `test_preset_resolves_like_accelerate_launch` runs the
launcher's own argument and environment resolution in-process. (tests/test_config.py already loads every
profile and checks its pretrain/sft data and header; here: the other stages' data, and cross references.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "configs").glob("*.y*ml"))
PRESET_DIR = ROOT / "configs" / "accelerate"
PRESETS = sorted(PRESET_DIR.glob("*.y*ml"))

# What the pipeline fills from each stage's config (pipeline/distributed.py); a preset must leave them out.
STAGE_OWNED = ("gradient_clipping", "gradient_accumulation_steps")
STAGE_OWNED_DS_JSON = (*STAGE_OWNED, "train_batch_size", "train_micro_batch_size_per_gpu")

# A data source that is not a local file or folder is read as a hub data set `owner/name[:split]`
# (pipeline/data.py); one that looks like a file name must exist.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?::[^:]+)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


# --------------------------------------------------------------------------------------------- profiles


def _data_sources(cfg: Config) -> dict[str, str | None]:
    """Every data source a profile names, by dotted key."""
    sources: dict[str, str | None] = {"tokenizer.train_data": cfg.tokenizer.train_data}
    for stage in ("pretrain", "sft", "rm", "ppo"):
        data = getattr(cfg, stage).data
        sources[f"{stage}.data.train"] = data.train
        sources[f"{stage}.data.eval"] = data.eval
    sources["rm.normalize_data"] = cfg.rm.normalize_data
    sources["ppo.ptx_data"] = cfg.ppo.ptx_data
    sources["ppo.ptx_eval_data"] = cfg.ppo.ptx_eval_data
    return sources


def test_configs_dirs_have_what_ships() -> None:
    assert {p.stem for p in PROFILES} >= {"tiny", "gpt2"}
    assert {p.stem for p in PRESETS} >= {"ddp", "zero2", "zero3", "zero3_offload"}


@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
def test_profile_loads_and_every_stage_names_usable_data(path: Path) -> None:
    cfg = load_config(path, [])
    assert isinstance(cfg, Config) and cfg.profile == path.stem
    for key, source in _data_sources(cfg).items():
        if source is None:
            continue
        if source in cfg.datasets:  # a registry name (its kind is checked when the profile loads): where it points
            source = cfg.datasets[source].path or cfg.datasets[source].hub or ""
        if (ROOT / source).exists():
            continue
        assert _HUB_ID.match(source) and not source.endswith(_FILE_SUFFIXES), (
            f"{path.name}: {key} = {source!r} is neither an existing file or folder nor a hub data set name"
        )


@pytest.mark.parametrize("path", PROFILES + PRESETS, ids=[p.name for p in PROFILES + PRESETS])
def test_launcher_presets_named_in_a_shipped_yaml_exist(path: Path) -> None:
    for name in re.findall(r"configs/accelerate/([\w.-]+\.ya?ml)", path.read_text()):
        assert (PRESET_DIR / name).is_file(), f"{path.name} names configs/accelerate/{name}: no such file"


# ----------------------------------------------------------------------------------- accelerate presets


@dataclass(frozen=True)
class Preset:
    """What a launcher preset's name promises."""

    deepspeed: bool
    zero_stage: int | None = None
    offload: str = "none"


def expected_preset(name: str) -> Preset:
    """The setup a preset's file name stands for. A new kind of preset must be described here."""
    if name == "ddp":
        return Preset(deepspeed=False)
    if name.startswith("zero2"):
        return Preset(deepspeed=True, zero_stage=2, offload="cpu" if "offload" in name else "none")
    if name.startswith("zero3"):
        return Preset(deepspeed=True, zero_stage=3, offload="cpu" if "offload" in name else "none")
    pytest.fail(f"configs/accelerate/{name}.yaml is not covered: say what it must be in expected_preset()")


def _header(path: Path) -> list[str]:
    """The comment lines that open the file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_is_what_its_name_says(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import ComputeEnvironment, DistributedType

    want = expected_preset(path.stem)
    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())

    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.num_machines == 1 and cfg.machine_rank == 0
    assert cfg.num_processes >= 2
    assert re.search(r"^num_processes:.*#.*set to your number of GPUs", path.read_text(), re.M), (
        f"{path.name}: num_processes needs its 'set to your number of GPUs' comment"
    )
    assert cfg.mixed_precision == "bf16"
    # CPU mode (`--cpu`, `use_cpu: true`, Accelerator(cpu=True)) is plain data parallelism without DeepSpeed;
    # DeepSpeed runs on a CPU-only machine without it (pipeline/distributed.py).
    assert cfg.use_cpu is False and raw.get("use_cpu") is False, f"{path.name}: use_cpu must be false"
    assert "gradient_accumulation_steps" not in raw and "gradient_clipping" not in raw

    if not want.deepspeed:
        assert cfg.distributed_type == DistributedType.MULTI_GPU
        assert not cfg.deepspeed_config
    else:
        ds = cfg.deepspeed_config
        assert cfg.distributed_type == DistributedType.DEEPSPEED
        assert ds["zero_stage"] == want.zero_stage
        assert ds.get("offload_optimizer_device", "none") == want.offload
        assert ds.get("offload_param_device", "none") == (want.offload if want.zero_stage == 3 else "none")
        if want.zero_stage == 3:
            assert ds.get("zero3_save_16bit_model") is True, f"{path.name}: set zero3_save_16bit_model: true"
        for key in STAGE_OWNED:
            assert ds.get(key, "auto") == "auto", (
                f"{path.name}: deepspeed_config.{key} comes from each stage's config; remove it here"
            )
        if ds.get("deepspeed_config_file"):  # a DeepSpeed json must leave the same keys to the pipeline
            ds_json = json.loads((ROOT / ds["deepspeed_config_file"]).read_text())
            for key in STAGE_OWNED_DS_JSON:
                assert ds_json.get(key, "auto") == "auto", f"{ds['deepspeed_config_file']}: remove {key}"

    header = _header(path)
    assert len(header) >= 3, f"{path.name}: begins with a header comment saying what it is for"
    command = f"--config_file configs/accelerate/{path.name}"
    assert any("make " in line and "accelerate launch" in line and command in line for line in header), (
        f"{path.name}: the header needs its `make ... LAUNCH=\"accelerate launch {command} -m\"` line"
    )


DEEPSPEED_PRESETS = [p for p in PRESETS if p.stem.startswith("zero")]


@pytest.mark.parametrize("path", DEEPSPEED_PRESETS, ids=[p.name for p in DEEPSPEED_PRESETS])
def test_preset_resolves_like_accelerate_launch(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`accelerate launch --config_file <preset> --num_processes 2 --mixed_precision no` (what the tests run
    on CPU machines), resolved in-process up to the DeepSpeed config each launched process would build: the
    launcher's own code, with only the step that starts the processes replaced."""
    import accelerate.commands.launch as launch
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    want = expected_preset(path.stem)
    launched: list[object] = []
    # Everything `accelerate launch` does except starting the processes.
    monkeypatch.setattr(launch, "deepspeed_launcher", launched.append)
    monkeypatch.setattr(launch, "simple_launcher", launched.append)
    monkeypatch.setattr(launch, "multi_gpu_launcher", launched.append)
    args = launch.launch_command_parser().parse_args(
        ["--config_file", str(path), "--num_processes", "2", "--mixed_precision", "no", "-m", "pipeline"]
    )
    launch.launch_command(args)
    assert launched == [args] and args.use_deepspeed and not args.cpu, f"{path.name}: not a DeepSpeed launch"
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env.get("ACCELERATE_USE_CPU", "false").lower() != "true"
    for key in list(env):
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, env[key])

    ds = DeepSpeedPlugin().deepspeed_config
    zero = ds["zero_optimization"]
    assert zero["stage"] == want.zero_stage
    assert zero["offload_optimizer"]["device"] == want.offload
    assert zero["offload_param"]["device"] == (want.offload if want.zero_stage == 3 else "none")
    if want.zero_stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # Left for build_accelerator / the Trainer to fill from the stage's config.
    for key in STAGE_OWNED_DS_JSON:
        assert ds.get(key, "auto") == "auto", f"{path.name}: the resolved DeepSpeed config sets {key}"
