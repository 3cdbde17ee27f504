"""resume=auto from the checkpoint mirror: a rank whose own run_dir has no checkpoint (a node that joined a
cluster without shared storage, a lost disk) fetches the mirror's newest one, verifies it and continues
bit-exactly. Real 2-rank ``deepspeed`` runs; the mirror is the real S3 store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards import store
from pretrain.distributed import free_port
from tests.helpers import TINY_OVERRIDES, launcher_env

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _train(run_dir: Path, clips: Path, *extra: str) -> str:
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/pretrain.py", "--config", "launch/configs/smoke.yaml", *TINY_OVERRIDES, f"data.url={clips}",
           f"run_dir={run_dir}", "max_steps=8", "log_every=1", "data.num_workers=1", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


@pytest.mark.integration
def test_a_fresh_run_dir_resumes_from_the_mirror_bit_exactly(clips_dir, tmp_path, s3_env):
    reference = tmp_path / "reference"
    _train(reference, clips_dir, "checkpoint_every=0")
    mirror = s3_env.url("mirror-resume/run")

    # First node: 4 of 8 steps, checkpoint mirrored to S3, then the node (its run_dir) is gone.
    first = tmp_path / "first"
    _train(first, clips_dir, "checkpoint_every=4", "stop_at_step=4", f"checkpoint.mirror_url={mirror}")
    assert store.read_bytes(store.join(mirror, "latest")).decode().strip() == "step-00000004"

    # A fresh run_dir with the same mirror: the checkpoint is fetched, verified and resumed from.
    second = tmp_path / "second"
    log = _train(second, clips_dir, "checkpoint_every=4", f"checkpoint.mirror_url={mirror}")
    assert "fetched step-00000004 from the mirror" in log
    assert (second / "checkpoints/latest").read_text().strip() == "step-00000008"
    resumed, expected = _losses(second), _losses(reference)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == expected[s] for s in resumed), (resumed, expected)
    assert not list((second / "checkpoints").glob("*.fetching-*"))


@pytest.mark.integration
def test_a_tampered_mirror_is_refused_and_nothing_is_loaded_from_it(clips_dir, tmp_path, s3_env):
    mirror = s3_env.url("mirror-resume/tampered")
    first = tmp_path / "first"
    _train(first, clips_dir, "checkpoint_every=4", "stop_at_step=4", f"checkpoint.mirror_url={mirror}")
    victim = next(n for n in sorted((first / "checkpoints/step-00000004").rglob("*.pt")))
    rel = victim.relative_to(first / "checkpoints").as_posix()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only the sha256 can tell
    store.put_bytes(bytes(data), store.join(mirror, rel))

    second = tmp_path / "second"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/pretrain.py", "--config", "launch/configs/smoke.yaml", *TINY_OVERRIDES, f"data.url={clips_dir}",
           f"run_dir={second}", "max_steps=8", "data.num_workers=1", f"checkpoint.mirror_url={mirror}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    # The copy fails verification: the run refuses it by name instead of training on tampered weights.
    assert proc.returncode != 0, out[-3000:]
    assert "does not match its sha256" in out and Path(rel).name in out
    assert not (second / "metrics.jsonl").exists() or not _losses(second)
