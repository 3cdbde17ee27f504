"""Fault-injection suite (``pytest -m faults``): shared data, launch helpers and the summary line.

Every test injects one kind of fault into a real training run (the ``python``/``torchrun`` launchers, a real
SeaweedFS store) and records what happened with :func:`record`; the session ends with one line
``faults suite: N faults injected, M survived, data lost = K``. "Survived" means the expected outcome was
observed (the run continued, or stopped with a clear error and an intact last checkpoint); "data lost" counts
checkpoints that became unusable and training samples lost or repeated beyond the stream's documented bound.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.distributed import free_port
from tests.helpers import TINY_OVERRIDES, launcher_env

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SMOKE = "launch/configs/smoke.yaml"
TINY = [*TINY_OVERRIDES, "data.num_workers=1", "log_every=1"]

_RECORDS: list[dict] = []


def record(case: str, injected: int = 1, survived: bool = True, data_lost: int = 0, **numbers) -> None:
    """Note one fault case's outcome for the summary line (call it after the case's assertions passed)."""
    _RECORDS.append(
        {"case": case, "injected": injected, "survived": survived, "data_lost": data_lost, **numbers}
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    injected = sum(r["injected"] for r in _RECORDS)
    survived = sum(r["injected"] for r in _RECORDS if r["survived"])
    lost = sum(r["data_lost"] for r in _RECORDS)
    terminalreporter.section("fault injection")
    for r in _RECORDS:
        extra = ", ".join(
            f"{k}={v}" for k, v in r.items() if k not in ("case", "injected", "survived", "data_lost")
        )
        terminalreporter.write_line(
            f"  {r['case']}: injected={r['injected']} survived={r['survived']} {extra}"
        )
    terminalreporter.write_line(
        f"faults suite: {injected} faults injected, {survived} survived, data lost = {lost}"
    )


env = launcher_env


def command(launcher: str, args: list[str]) -> list[str]:
    script = ["launch/pretrain.py", "--config", SMOKE, *TINY, *args]
    if launcher == "torchrun":
        return [
            str(VENV_BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            *script,
        ]
    return [sys.executable, *script]


def start(launcher: str, args: list[str], **env_extra: str) -> subprocess.Popen:
    """Start a run in its own process group (so a test can always stop everything it started)."""
    return subprocess.Popen(
        command(launcher, args), cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out = proc.communicate()[0]
        raise AssertionError(f"run did not end within {timeout} s:\n{out[-4000:]}") from None
    return proc.returncode, out


def run(launcher: str, args: list[str], timeout: float = 150, **env_extra: str) -> tuple[int, str]:
    return finish(start(launcher, args, **env_extra), timeout)


def kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = metrics(run_dir)
        if lines and lines[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.02)
    kill_group(proc)
    raise AssertionError(f"step {step} not reached within {timeout} s")


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints/latest"
    return Path(run_dir) / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None


def checkpoint_step(run_dir: Path) -> int | None:
    path = latest_checkpoint(run_dir)
    return json.loads((path / "meta.json").read_text())["step"] if path else None


def data_position(run_dir: Path, rank: int = 0) -> dict:
    """The data-stream position saved by ``rank`` in the latest checkpoint (epoch, next batch index...)."""
    import torch

    state = torch.load(
        latest_checkpoint(run_dir) / f"rank-{rank:05d}.pt", map_location="cpu", weights_only=False
    )
    return state["data"]


def assert_clean_error(rc: int, out: str, *needles: str, code: int = 2) -> str:
    """Exit ``code``, one ``error:`` line naming every needle, no traceback; returns that line."""
    assert rc == code, f"exit code {rc} (wanted {code}):\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors, out[-3000:]
    for needle in needles:
        assert any(needle in line for line in errors), (needle, errors)
    return errors[0]


@pytest.fixture(scope="session")
def reference(clips_dir, tmp_path_factory) -> dict[int, float]:
    """Losses of one uninterrupted 1-rank run of 6 steps (checkpoints every 2): what resumed runs must match."""
    run_dir = tmp_path_factory.mktemp("faults-reference") / "run"
    rc, out = run("python", [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS])
    assert rc == 0, out[-4000:]
    losses = {m["step"]: m["loss"] for m in metrics(run_dir)}
    assert sorted(losses) == list(range(1, 7))
    return losses


REF_ARGS = ["max_steps=6", "checkpoint_every=2"]


def copy_dataset(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
