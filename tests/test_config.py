"""Typed config: YAML + dotted overrides; unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from common.configio import load_config, parse_overrides, save_config
from common.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Data:
    url: str = "runs/data"
    batch: int = 8
    access_key: str | None = None


@dataclass
class Run:
    seed: int = 0
    mode: Literal["a", "b", "c"] = "c"
    offsets: list[float] = field(default_factory=lambda: [0.5, 1.0])
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"config key 'seed': must be >= 0, got {self.seed}")


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 3e-4\ndata:\n  batch: 16\n")
    cfg = load_config(Run, path, ["data.url=s3://bucket/prefix", "optim.betas=[0.8, 0.9]", "offsets=[1, 2]"])
    assert cfg.seed == 3 and cfg.optim.lr == pytest.approx(3e-4) and cfg.data.batch == 16
    assert cfg.data.url == "s3://bucket/prefix" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.offsets == [1.0, 2.0] and all(isinstance(v, float) for v in cfg.offsets)
    assert cfg.mode == "c"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("data.batch=abc", "config key 'data.batch': expected an integer"),
        ("data.batch=1.5", "config key 'data.batch': expected an integer"),
        ("mode=z", "config key 'mode': must be one of"),
        ("optim=3", "config key 'optim': expected a section"),
        ("seed=-1", "config key 'seed': must be >= 0"),
        ("noequals", "not of the form key=value"),
        ("offsets=[1, x]", "config key 'offsets[1]': expected a number"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(Run, None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Run, bad)


def test_saved_config_round_trips_and_redacts(tmp_path):
    cfg = load_config(Run, None, ["data.access_key=AKIASECRET", "seed=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert saved["data"]["access_key"] == "***"
    assert "AKIASECRET" not in path.read_text()
    saved["data"]["access_key"] = None
    again = load_config(Run, None, [])
    reloaded_path = tmp_path / "again.yaml"
    reloaded_path.write_text(yaml.safe_dump(saved))
    again = load_config(Run, reloaded_path)
    assert again.seed == 7 and again.optim == cfg.optim


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=true"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": True}


def test_config_reference_is_current_and_complete():
    """docs/CONFIG.md documents every key of every entry point, with a meaning (regenerate if this fails)."""
    from launch.config_reference import OUTPUT, render

    text = render()
    assert OUTPUT.read_text() == text, "docs/CONFIG.md is stale: run python -m launch.config_reference"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 80
    undocumented = [row.split("|")[1].strip() for row in rows if row.rstrip().endswith("|  |")]
    assert not undocumented, f"config keys without a meaning: {undocumented}"


def test_global_batch_splits_evenly_or_names_the_key():
    from pretrain.config import PretrainConfig, resolve_global_batch

    cfg = load_config(PretrainConfig, None, ["data.global_batch_clips=64"])
    resolve_global_batch(cfg, world_size=8)
    assert cfg.data.batch_clips == 8
    cfg = load_config(PretrainConfig, None, ["data.global_batch_clips=64"])
    with pytest.raises(
        ConfigError, match=r"'data.global_batch_clips': 64 clips cannot be split evenly over 3 ranks"
    ):
        resolve_global_batch(cfg, world_size=3)
    cfg = load_config(PretrainConfig, None, ["data.global_batch_clips=4"])
    with pytest.raises(ConfigError, match="fewer than 2"):
        resolve_global_batch(cfg, world_size=4)
    untouched = load_config(PretrainConfig, None, ["data.batch_clips=5"])
    resolve_global_batch(untouched, world_size=3)
    assert untouched.data.batch_clips == 5
