"""Typed config: YAML + dotted overrides; unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from common.configio import load_config, parse_overrides, save_config
from common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


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


def test_literal_keys_take_their_own_type():
    """A Literal of ints does not take YAML's true (True == 1 in Python)."""

    @dataclass
    class Stage:
        stage: Literal[0, 1, 2] = 0

    assert load_config(Stage, None, ["stage=2"]).stage == 2
    with pytest.raises(ConfigError, match="config key 'stage': must be one of"):
        load_config(Stage, None, ["stage=true"])


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_merges_section_by_section(tmp_path):
    """base: FILE (relative to the naming file, chains allowed): base < file < command line."""
    _write(tmp_path / "shared/root.yaml", "seed: 1\nmode: a\noptim:\n  lr: 0.5\n  betas: [0.1, 0.2]\n")
    _write(tmp_path / "shared/mid.yaml", "base: root.yaml\nseed: 2\ndata:\n  batch: 4\n")
    top = _write(tmp_path / "runs/top.yaml", "base: ../shared/mid.yaml\noptim:\n  lr: 3e-4\n")
    cfg = load_config(Run, top)
    assert cfg.seed == 2  # mid overrides root
    assert cfg.mode == "a" and cfg.optim.betas == (0.1, 0.2) and cfg.data.batch == 4  # kept from the bases
    assert cfg.optim.lr == pytest.approx(3e-4)  # the file overrides its bases, key by key inside a section
    cfg = load_config(Run, top, ["seed=9", "optim.lr=0.1"])
    assert cfg.seed == 9 and cfg.optim.lr == 0.1 and cfg.data.batch == 4  # the command line wins over all


def test_base_cycles_and_missing_bases_name_the_file(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(
        ConfigError, match=r"a\.yaml' \(base of '.*b\.yaml'\) comes back in its own base chain"
    ):
        load_config(Run, a)
    selfish = _write(tmp_path / "self.yaml", "base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="own base chain"):
        load_config(Run, selfish)
    orphan = _write(tmp_path / "orphan.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone\.yaml' \(base of '.*orphan\.yaml'\) does not exist"):
        load_config(Run, orphan)
    with pytest.raises(ConfigError, match="'base' must be a YAML file path"):
        load_config(Run, _write(tmp_path / "bad.yaml", "base: [a.yaml]\n"))


def test_base_is_not_a_config_key(tmp_path):
    """base: is consumed while reading: it never reaches the dataclass or the saved config."""
    _write(tmp_path / "root.yaml", "seed: 5\n")
    cfg = load_config(Run, _write(tmp_path / "top.yaml", "base: root.yaml\n"))
    saved = yaml.safe_load(save_config(cfg, tmp_path / "out/config.yaml").read_text())
    assert "base" not in saved and saved["seed"] == 5
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(Run, None, ["base=root.yaml"])


def test_shipped_variants_are_their_base_plus_few_keys():
    """The variant configs resolve through their base; what they change is only what they list."""
    from common.configio import to_dict
    from pretrain.config import PretrainConfig

    configs = REPO / "launch/configs"
    for variant, base in (("demo_simclr", "demo"), ("simclr", "sslfer")):
        text = yaml.safe_load((configs / f"{variant}.yaml").read_text())
        assert text["base"] == f"{base}.yaml"
        own = {f"{s}.{k}" if isinstance(v, dict) else s for s, v in text.items() for k in (v or {})}
        flat_variant = _flatten(to_dict(load_config(PretrainConfig, configs / f"{variant}.yaml")))
        flat_base = _flatten(to_dict(load_config(PretrainConfig, configs / f"{base}.yaml")))
        changed = {k for k in flat_base if flat_base[k] != flat_variant[k]}
        assert changed <= own, (
            f"{variant}.yaml differs from {base}.yaml in keys it does not set: {changed - own}"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_pretrain_help_lists_every_key_with_its_meaning():
    """launch/pretrain.py --help: every key of PretrainConfig, with its type, default and a meaning."""
    from common.config_doc import config_keys
    from pretrain.config import PretrainConfig

    keys = config_keys(PretrainConfig)
    assert len(keys) > 80
    assert not [k.key for k in keys if not k.meaning], "every config key needs a trailing # comment"
    out = subprocess.run(
        [sys.executable, str(REPO / "launch/pretrain.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("usage:")
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and "default" in line}
    assert listed >= {k.key for k in keys}
    for k in keys:
        assert f"  {k.key} ({k.type}, default {k.default!r})" in out


def test_meanings_survive_wrapped_fields():
    """A field the formatter wrapped keeps its comment; comment lines above a field are not its meaning."""
    from common.config_doc import field_meanings

    @dataclass
    class Wrapped:
        # a note on why, not the meaning
        plain: int = 1  # the meaning
        wrapped: list[int] = field(  # still the meaning
            default_factory=lambda: [1, 2]
        )
        bare: int = 0

    assert field_meanings(Wrapped) == {"plain": "the meaning", "wrapped": "still the meaning"}


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

    loaded = load_config(PretrainConfig, None, ["data.global_batch_clips=64"])
    cfg = resolve_global_batch(loaded, world_size=8)
    assert cfg.data.batch_clips == 8
    # a new config; the loaded one is kept
    assert loaded.data.batch_clips == PretrainConfig().data.batch_clips
    cfg = load_config(PretrainConfig, None, ["data.global_batch_clips=64"])
    with pytest.raises(
        ConfigError, match=r"'data.global_batch_clips': 64 clips cannot be split evenly over 3 ranks"
    ):
        resolve_global_batch(cfg, world_size=3)
    cfg = load_config(PretrainConfig, None, ["data.global_batch_clips=4"])
    with pytest.raises(ConfigError, match="fewer than 2"):
        resolve_global_batch(cfg, world_size=4)
    untouched = load_config(PretrainConfig, None, ["data.batch_clips=5"])
    assert resolve_global_batch(untouched, world_size=3).data.batch_clips == 5


def test_faceswap_probability_ramps_with_the_batch_position():
    """faceswap.p ramps linearly from 0 over p_warmup_steps batches of the run (0-based), then stays at p."""
    from pretrain.faceswap import FaceSwapConfig

    ramp = FaceSwapConfig(p=0.8, p_warmup_steps=4)
    assert [ramp.probability_at(s) for s in (0, 1, 2, 4, 9)] == pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])
    assert FaceSwapConfig(p=0.5).probability_at(0) == 0.5  # no warmup: p from the first batch
    assert FaceSwapConfig(p=1.0, enabled=False, p_warmup_steps=4).probability_at(9) == 0.0
    delayed = FaceSwapConfig(p=0.8, start_step=10, p_warmup_steps=4)  # the curriculum: no swaps, then a ramp
    assert [delayed.probability_at(s) for s in (0, 9, 10, 11, 14, 99)] == pytest.approx(
        [0, 0, 0, 0.2, 0.8, 0.8]
    )
    assert FaceSwapConfig(p=0.8, start_step=3).probability_at(3) == 0.8


def test_auto_input_workers_use_only_cores_the_ranks_leave_over():
    from pretrain.config import AUTO_MAX_WORKERS, auto_input_workers, spare_cores_per_rank

    assert (
        auto_input_workers("cpu", cores=2, local_ranks=2, compute_threads=1) == 1
    )  # no spare core: one (idle)
    assert spare_cores_per_rank("cpu", cores=2, local_ranks=2, compute_threads=1) == 0
    assert auto_input_workers("cpu", cores=4, local_ranks=2, compute_threads=2) == 1
    assert auto_input_workers("cpu", cores=6, local_ranks=2, compute_threads=1) == 2
    assert auto_input_workers("cpu", cores=64, local_ranks=2, compute_threads=1) == AUTO_MAX_WORKERS
    assert (
        auto_input_workers("cuda", cores=24, local_ranks=8, compute_threads=8) == 2
    )  # one feeding thread each
    assert spare_cores_per_rank("cuda", cores=8, local_ranks=8, compute_threads=1) == 0
    assert spare_cores_per_rank("cpu", cores=1, local_ranks=4, compute_threads=1) < 0  # oversubscribed
    assert auto_input_workers("cpu", cores=1, local_ranks=4, compute_threads=1) == 1


def test_input_workers_and_priority_auto_resolve_for_this_host(monkeypatch):
    import os

    import torch

    from pretrain.config import PretrainConfig, auto_input_workers, resolve_input_workers

    loaded = load_config(PretrainConfig, None, [])
    assert (loaded.data.num_workers, loaded.data.input_priority) == ("auto", "auto")
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    resolved = resolve_input_workers(loaded, "cpu")
    assert resolved.data.num_workers == auto_input_workers("cpu", cores, 1, 1)
    assert resolved.data.input_priority == ("normal" if cores > 1 else "idle")
    assert (loaded.data.num_workers, loaded.data.input_priority) == ("auto", "auto")  # a copy
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", str(cores))  # the deepspeed launcher's name: as many ranks as cores
    shared = resolve_input_workers(loaded, "cpu").data
    assert (shared.num_workers, shared.input_priority) == (1, "idle")  # no spare core: one thread, idle
    inline = resolve_input_workers(load_config(PretrainConfig, None, ["data.num_workers=0"]), "cpu").data
    assert (inline.num_workers, inline.input_priority) == (0, "normal")  # no thread to lower
    set_both = load_config(PretrainConfig, None, ["data.num_workers=3", "data.input_priority=normal"])
    assert resolve_input_workers(set_both, "cpu") is set_both
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(PretrainConfig, None, ["data.num_workers=-1"])
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(PretrainConfig, None, ["data.num_workers=many"])
    with pytest.raises(ConfigError, match="data.input_priority"):
        load_config(PretrainConfig, None, ["data.input_priority=low"])
    monkeypatch.delattr(os, "SCHED_IDLE")  # a platform without it: idle is refused, auto falls back to normal
    with pytest.raises(ConfigError, match="data.input_priority.*SCHED_IDLE.*input_priority=normal"):
        load_config(PretrainConfig, None, ["data.input_priority=idle"])
    assert resolve_input_workers(loaded, "cpu").data.input_priority == "normal"


def test_idle_priority_input_threads_run_under_sched_idle_and_make_the_same_batches():
    """data.input_priority=idle: the reader and every worker thread of the Prefetcher run under SCHED_IDLE (the
    consuming thread keeps its own), in the same order as inline."""
    import os
    import threading

    from pretrain.pipelines.prefetch import Prefetcher

    def groups():
        for i in range(12):
            yield i, {"after": i}

    seen = {}

    def job(i):
        seen[threading.current_thread().name] = os.sched_getscheduler(0)
        return i * i

    for priority, want in (("idle", os.SCHED_IDLE), ("normal", os.SCHED_OTHER)):
        seen.clear()
        pre = Prefetcher(groups(), job, workers=2, depth=3, priority=priority)
        try:
            got = [pre.get() for _ in range(12)]
        finally:
            pre.stop()
        assert got == [(i * i, {"after": i}) for i in range(12)]
        assert seen and set(seen.values()) == {want}, seen
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the training thread is never lowered


class _WriteThrough:
    """A stand-in for stderr under PYTHONUNBUFFERED=1: every write() call reaches the pipe on its own."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_error_line_reaches_stderr_in_one_write(monkeypatch):
    """Ranks that fail together print at the same instant into one log; a line written in two parts (text, then
    newline, as print does unbuffered) let another rank's line land between them, and the two ran together."""
    from launch import pretrain

    stderr = _WriteThrough()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert pretrain.main(["--config", str(REPO / "launch/configs/smoke.yaml"), "data.batch_clips=zero"]) == 2
    assert len(stderr.writes) == 1, stderr.writes
    line = stderr.writes[0]
    assert line.startswith("error: ") and "data.batch_clips" in line and line.endswith("\n"), line
    assert line.count("\n") == 1, line

    stderr.writes.clear()
    pretrain.print_error("one\nmessage")  # the message's own newlines are the caller's; still one write
    assert stderr.writes == ["error: one\nmessage\n"]
