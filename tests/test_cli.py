"""The user-facing CLI helpers: `<stage> --help` generated from the typed configs, and `env` for bug reports."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import platform
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline import env
from pipeline.__main__ import main
from pipeline.config import LOAD_KEYS, STAGE_READS, STAGES, Config, load_config

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "configs").glob("*.yaml"))


def leaf_fields(cls: type, prefix: str) -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every non-section key under dataclass `cls`, walked independently of the CLI."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f))
    return out


def keys_read_by(stage: str) -> list[tuple[str, dataclasses.Field]]:
    """Every key of the stage's own section plus the shared keys it reads."""
    keys = leaf_fields(Config, "")
    wanted = (stage, *STAGE_READS[stage])
    return [(k, f) for k, f in keys if any(k == w or k.startswith(w + ".") for w in wanted)]


def value_of(cfg: Config, key: str) -> object:
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def stage_help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_names_every_key_with_its_help_and_profile_value(
    stage: str, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = stage_help_text(capsys, stage, "--help", "--config", str(path))
    cfg = load_config(path)
    flat = " ".join(out.split())  # help texts are wrapped over lines
    keys = keys_read_by(stage)
    assert len(keys) > 15
    for key, f in keys:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{key} = ")), None)
        assert line is not None, f"{stage} --help does not name {key}"
        shown = line.split(" = ", 1)[1].split("    [")[0]
        value = value_of(cfg, key)
        if isinstance(value, dict) and value:  # the data registry: its entries' names
            assert all(name in flat for name in value), f"{key}: {shown!r} lacks entries of {list(value)}"
            continue
        expected = {None: "null", True: "true", False: "false"}.get(value, str(value)) \
            if isinstance(value, bool | None) else str(value)
        if isinstance(value, list):  # one line in YAML's flow style, as it is typed in an override
            expected = "[" + ", ".join(map(str, value)) + "]"
        assert shown in (expected, repr(value)), f"{key}: shows {shown!r}, profile has {value!r}"
        assert " ".join(f.metadata["help"].split()) in flat, f"{stage} --help lacks the help of {key}"
    assert all(len(line) <= 100 for line in out.splitlines()), "wider than a 100-column terminal"
    # A key of another stage's section that this stage does not read is not listed.
    other = next(s for s in STAGES if s != stage and not any(r.startswith(s + ".") for r in STAGE_READS[stage]))
    assert f"{other}.lr = " not in out


def test_stage_help_shows_types_bounds_and_the_values_after_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    out = stage_help_text(capsys, "sft", "--help", "--config", "configs/tiny.yaml", "sft.lr=3e-4", "seed=7")
    lines = out.splitlines()
    # The override wins over the profile, and the built-in default is named when the value differs.
    assert "  sft.lr = 0.0003    [float, > 0; default 0.0005]" in lines
    assert "  seed = 7    [int, >= 0; default 0]" in lines
    assert "  sft.batch_size = 32    [int, >= 1; default 16]" in lines  # the tiny profile's own value
    assert "  sft.lr_scheduler = cosine    ['cosine' | 'linear' | 'constant' | 'constant_with_warmup']" in lines
    assert "  sft.eval_steps = null    [int | null, >= 1]" in lines
    assert "sft.lr=3e-4 seed=7" in " ".join(out.split())
    # Sections head their keys; the stage's own comes first, shared ones after.
    assert lines.index("sft:  Stage 2: supervised fine-tuning.") < lines.index(
        "sft.generation:  Sampled-generation eval of the initial and final model.") < lines.index(
        "tracking:  Experiment tracking.")
    # pretrain builds the base model, so its help has the model and tokenizer sections; sft's does not.
    pretrain_out = stage_help_text(capsys, "pretrain", "--help", "model.tiny.dropout=0.0")
    assert "  model.tiny.dropout = 0.0    [float, >= 0 and < 1; default 0.1]" in pretrain_out.splitlines()
    assert "model.tiny.n_layer = " not in out
    # The other stage's keys rm and ppo fall back on are listed in their own group.
    rm_out = stage_help_text(capsys, "rm", "--help")
    assert "keys of other stages that rm reads:" in rm_out and "  sft.data.eval = data/tiny/demos.eval.jsonl" in rm_out


def test_stage_help_of_a_bad_profile_is_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", "--help", "sft.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'sft.lr' must be a number") and "Traceback" not in err


def test_general_help_points_to_stage_help(capsys: pytest.CaptureFixture[str]) -> None:
    out = stage_help_text(capsys, "--help")
    assert "usage: python -m pipeline" in out and "<stage> --help" in out and "env" in out
    assert stage_help_text(capsys, "keys", "--help") == out  # --help after a non-stage command: the general one
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "a command is required" in capsys.readouterr().err


def _cfg_reads(path: Path) -> set[str]:
    """Dotted config keys a module reads as `cfg.a.b...` (method calls like cfg.stage_dir(...) excluded)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == "cfg"):
            continue
        parts, cls, cur = [], Config, parents.get(node)
        while isinstance(cur, ast.Attribute) and dataclasses.is_dataclass(cls):
            names = {f.name for f in dataclasses.fields(cls)}
            if cur.attr not in names:
                break
            parts.append(cur.attr)
            cls = typing.get_type_hints(cls)[cur.attr]
            cur = parents.get(cur)
        if parts:
            reads.add(".".join(parts))
    return reads


@pytest.mark.parametrize("stage", STAGES)
def test_stage_reads_covers_what_the_stage_code_reads(stage: str) -> None:
    """A stage that starts reading a new shared key must list it in STAGE_READS, or --help would hide it."""
    stage_file = ROOT / "pipeline/stages" / f"{stage}.py"
    # The shared helpers a stage imports read the config for it.
    helpers = [ROOT / "pipeline" / f"{name}.py" for name in ("tracking", "training")
               if re.search(rf"^from pipeline(\.{name})? import .*\b{name}\b|^from pipeline\.{name} import",
                            stage_file.read_text(), re.M)]
    modules = [stage_file, *helpers]
    reads = set().union(*(_cfg_reads(m) for m in modules))
    assert f"{stage}" in {r.split(".")[0] for r in reads}
    covered = (stage, *STAGE_READS[stage])
    missing = [r for r in reads if not any(r == c or r.startswith(c + ".") for c in covered)]
    assert not missing, f"{stage} reads {missing} but STAGE_READS['{stage}'] does not list them"


def test_every_config_section_is_read_by_some_stage() -> None:
    read = {k.split(".")[0] for s in STAGES for k in (s, *STAGE_READS[s])}
    assert {f.name for f in dataclasses.fields(Config)} == read | set(LOAD_KEYS)
    assert not read & set(LOAD_KEYS)


# --------------------------------------------------------------------------------------------- env


def test_env_names_python_platform_hardware_and_every_package(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(":", 1) for line in out.splitlines())
    rows = {k: v.strip() for k, v in rows.items()}
    assert rows["python"].startswith(platform.python_version())
    assert rows["platform"] == platform.platform()
    assert rows["cpus"].split()[0].isdigit() and rows["memory"].endswith("GiB")
    assert rows["cuda available"] in ("no",) or rows["cuda available"].startswith("yes, ")
    assert "torch built with CUDA" in rows and "torch built with cuDNN" in rows
    for name in env.PACKAGES:
        try:
            expected = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            expected = "not installed"
        assert rows[name] == expected, name
    assert rows["torch"] != "not installed" and rows["transformers"] != "not installed"
    assert rows["pipeline"].startswith("0.1.0")


def test_env_runs_without_the_dependencies_installed() -> None:
    """`make env` is for broken installs too: with site-packages hidden (-S) it still reports, and says so."""
    proc = subprocess.run([sys.executable, "-S", "-m", "pipeline.env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {k: v.strip() for k, v in (line.split(":", 1) for line in proc.stdout.splitlines())}
    assert rows["torch"] == "not installed" and rows["deepspeed"] == "not installed"
    assert rows["gpu"] == "unknown (torch not installed)"


def test_env_lists_each_cuda_device_with_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU branch, on a CPU machine: torch.cuda answers as on a 2-GPU box."""
    import torch

    class Props:
        def __init__(self, i: int) -> None:
            self.name, self.total_memory, self.major, self.minor = f"NVIDIA H100 #{i}", 80 * 2**30, 9, 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", Props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    rows = dict(env.accelerators())
    assert rows["cuda available"] == "yes, 2 devices"
    assert rows["cuda:0"] == "NVIDIA H100 #0, 80.0 GiB, compute capability 9.0"
    assert rows["cuda:1"].startswith("NVIDIA H100 #1")
    assert rows["bf16 supported"] == "yes" and rows["CUDA_VISIBLE_DEVICES"] == "2,3"
