"""Config strictness: unknown keys, wrong types and out-of-range values fail and name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, stage_key

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_shipped_profile_loads_and_names_existing_files(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.profile == path.stem and cfg.run_dir == f"runs/{path.stem}"
    for source in (cfg.pretrain.data.train, cfg.pretrain.data.eval, cfg.sft.data.train, cfg.sft.data.eval):
        assert source is not None, path.name
        entry = cfg.datasets.get(source)  # a registry name: a hub data set, or a local path that must exist
        if entry is None or entry.path is not None:
            assert (ROOT / (entry.path if entry else source)).exists(), source
    # The header comment says what the profile is for and how to run it.
    header = path.read_text().splitlines()[:8]
    assert any("make " in line for line in header), f"{path.name} header lacks the command that runs it"


def test_unknown_key_fails_and_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'sft\.learnig_rate'; did you mean 'sft\.lr'"):
        load_config(ROOT / "configs/tiny.yaml", ["sft.learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'sft\.data\.tran'; did you mean 'sft\.data\.train'"):
        load_config(ROOT / "configs/tiny.yaml", ["sft.data.tran=x.jsonl"])
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/tiny.yaml").read_text() + "\nprettrain: {}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'prettrain'; did you mean 'pretrain'"):
        load_config(bad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.lr=fast", r"'sft\.lr' must be a number, got str 'fast'"),
        ("seed=true", r"'seed' must be an integer, got bool"),
        ("pretrain.batch_size=2.5", r"'pretrain\.batch_size' must be an integer, got float"),
        ("sft.bf16=1", r"'sft\.bf16' must be true or false"),
        ("sft.data.train=null", r"'sft\.data\.train' must be a string"),
        ("sft.lr_scheduler=exp", r"'sft\.lr_scheduler' must be one of 'cosine'"),
        ("sft.batch_size=0", r"'sft\.batch_size' must be >= 1, got 0"),
        ("pretrain.warmup_ratio=0.9", r"'pretrain\.warmup_ratio' must be <= 0\.5"),
        ("model.tiny.dropout=1.0", r"'model\.tiny\.dropout' must be < 1, got 1\.0"),
        ("model.tiny.n_head=3", r"model\.tiny\.n_embd \(128\) must be divisible by model\.tiny\.n_head \(3\)"),
        ("sft=3", r"'sft': expected a mapping|sft: expected a mapping"),
        ("sft.lr.x=1", r"override 'sft\.lr\.x': 'sft\.lr' is not a section"),
        ("noequals", r"not of the form dotted\.key=value"),
    ],
)
def test_wrong_type_or_range_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny.yaml", [override])


def test_missing_required_section_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("pretrain: {data: {train: a.txt}}\n")
    with pytest.raises(ConfigError, match=r"missing required config key 'sft'"):
        load_config(path)


def test_overrides_parse_like_yaml_and_win_over_the_file() -> None:
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["sft.lr=1e-4", "pretrain.max_steps=7", "model.name_or_path=some/dir", "tracking.wandb=false"],
    )
    assert cfg.sft.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; we accept it as a float
    assert cfg.pretrain.max_steps == 7
    assert cfg.model.name_or_path == "some/dir"
    assert cfg.tracking.wandb is False


def test_round_overrides_apply_to_later_rounds_only_and_under_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"include: [{ROOT / 'configs/tiny.yaml'}]\nrounds: {{overrides: [rm.epochs=7, 'ppo.lr=3e-5']}}\n")
    first, second = load_config(path), load_config(path, ["round=2"])
    assert (first.rm.epochs, first.ppo.lr) == (3, pytest.approx(1e-4))  # round 1 is the plain chain
    assert (second.rm.epochs, second.ppo.lr) == (7, pytest.approx(3e-5))
    assert load_config(path, ["rm.epochs=4", "round=3"]).rm.epochs == 4  # the command line wins, in any order
    assert load_config(path, ["round=2", "rounds.overrides=[]"]).rm.epochs == 3
    # a round's rm is rebuilt when the override changes, round 1's is not
    assert stage_key(first, "rm") != stage_key(second, "rm")
    assert stage_key(first, "rm") == stage_key(load_config(path, ["rounds.overrides=[rm.epochs=9]"]), "rm")
    assert load_config(ROOT / "configs/tiny.yaml", ["round=2"]).rm.epochs == 6  # the shipped tiny profile's


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("[rm.epoch=6]", r"p.yaml: rounds.overrides: unknown config key 'rm.epoch'; did you mean 'rm.epochs'"),
        ("[oops]", r"p.yaml: rounds.overrides\[0\] \('oops'\) is not of the form dotted.key=value"),
        ("[rm.epochs=6, round=3]", r"rounds.overrides\[1\] sets 'round'"),
        ("[rm.epochs=6, run_dir=x]", r"rounds.overrides\[1\] sets 'run_dir'"),
        ("rm.epochs=6", r"rounds.overrides must be a list"),
    ],
)
def test_bad_round_overrides_name_the_entry(tmp_path: Path, overrides: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"include: [{ROOT / 'configs/tiny.yaml'}]\nrounds: {{overrides: {overrides}}}\n")
    load_config(path)  # round 1 never reads them
    with pytest.raises(ConfigError, match=message):
        load_config(path, ["round=2"])


def test_stage_key_isolates_what_shapes_each_stage() -> None:
    base = load_config(ROOT / "configs/tiny.yaml")
    changed = load_config(ROOT / "configs/tiny.yaml", ["sft.lr=1e-4"])
    assert stage_key(base, "pretrain") == stage_key(changed, "pretrain")  # a new SFT lr must not rebuild pretrain
    assert stage_key(base, "sft") != stage_key(changed, "sft")


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_has_a_type_and_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main
    from pipeline.config import describe

    rows = describe()
    assert len(rows) > 40
    missing = [key for key, _, help_ in rows if not help_.strip()]
    assert not missing, f"config keys without help: {missing}"
    assert ("sft.lr_scheduler", "'cosine' | 'linear' | 'constant' | 'constant_with_warmup'") in [r[:2] for r in rows]
    assert main(["keys"]) == 0
    assert "sft.data.train" in capsys.readouterr().out
