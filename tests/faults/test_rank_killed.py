"""A rank SIGKILLed mid-run (2 ranks under torchrun): the survivor ends within the configured process-group
timeout instead of hanging, and ``resume=auto`` continues from the last checkpoint with the same batches."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.faults.conftest import (
    checkpoint_step,
    data_position,
    finish,
    metrics,
    record,
    run,
    start,
    wait_for_step,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DIST_TIMEOUT_S = 20  # dist_timeout_s of these runs: the bound on how long a survivor may wait for a dead peer


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    out = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "pretrain.py" in " ".join(child.cmdline()):
            out[int(rank)] = child.pid
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigkill_one_rank_bounded_exit_and_exact_resume(clips_dir, tmp_path):
    run_dir = tmp_path / "run"
    # 16 clips, 2 ranks x 2 clips: 4 steps per epoch; 10 steps cross two epoch boundaries.
    args = [f"data.url={clips_dir}", f"run_dir={run_dir}", "max_steps=10", "checkpoint_every=2",
            f"dist_timeout_s={DIST_TIMEOUT_S}"]  # fmt: skip
    proc = start("torchrun", args, SSLFER_INJECT_STEP_DELAY_S="0.4")
    wait_for_step(run_dir, 5, proc)
    ranks = _rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    before = {m["step"]: m["loss"] for m in metrics(run_dir)}
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    rc, out = finish(proc, timeout=DIST_TIMEOUT_S + 60)
    exit_s = time.monotonic() - killed_at
    assert rc != 0, out[-3000:]
    assert not psutil.pid_exists(ranks[0]) or psutil.Process(ranks[0]).status() == psutil.STATUS_ZOMBIE
    assert exit_s < DIST_TIMEOUT_S + 15, exit_s  # bounded: never a hang
    saved = checkpoint_step(run_dir)
    assert saved is not None and saved >= 4 and saved % 2 == 0, out[-3000:]

    rc, out = run("torchrun", [*args, "resume=auto"], timeout=240)
    assert rc == 0, out[-4000:]
    after = metrics(run_dir)
    assert [m["step"] for m in after] == list(range(1, 11))  # no step missing or doubled
    # Steps between the checkpoint and the kill ran twice: bit-equal losses = the same clips, frames, augmentations.
    rerun = [s for s in before if s > saved]
    assert rerun, (saved, sorted(before))
    for m in after:
        if m["step"] in before:
            assert m["loss"] == before[m["step"]], (m["step"], m["loss"], before[m["step"]])
    # The data position saved at the end is exactly 10 batches in: epoch 2, batch 2 (4 batches per epoch).
    for rank in (0, 1):
        position = data_position(run_dir, rank)
        assert (position["epoch"], position["index"]) == (2, 2), position
    record("rank SIGKILL (2 ranks)", survivor_exit_s=round(exit_s, 1), resumed_from_step=saved,
           rerun_steps_equal=len(rerun))  # fmt: skip


def test_hung_rank_survivor_exits_after_dist_timeout(clips_dir, tmp_path):
    """A rank that stops answering (SIGSTOP: alive, so the launcher sees nothing wrong): the other rank's next
    collective fails after ``dist_timeout_s`` and it exits, leaving the last checkpoint intact."""
    timeout_s = 6
    run_dir = tmp_path / "run"
    args = [f"data.url={clips_dir}", f"run_dir={run_dir}", "max_steps=10", "checkpoint_every=2",
            f"dist_timeout_s={timeout_s}"]  # fmt: skip
    proc = start("torchrun", args, SSLFER_INJECT_STEP_DELAY_S="0.4")
    ranks: dict[int, int] = {}
    try:
        wait_for_step(run_dir, 3, proc)
        ranks = _rank_pids(proc.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        survivor = psutil.Process(ranks[0])
        try:
            survivor.wait(timeout=timeout_s + 30)
        except psutil.TimeoutExpired:
            pytest.fail(
                f"rank 0 still waiting {timeout_s + 30} s after its peer hung (dist_timeout_s={timeout_s})"
            )
        exit_s = time.monotonic() - stopped_at
    finally:
        # The stopped rank cannot act on the launcher's SIGTERM and holds the output pipe: kill it by PID.
        for pid in ranks.values():
            _kill(pid)
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]
    assert exit_s < timeout_s + 10, exit_s
    assert exit_s >= timeout_s - 1, (exit_s, out[-3000:])  # it was the timeout, not something else
    assert checkpoint_step(run_dir) in (2, 4)
    record("hung rank (SIGSTOP, 2 ranks)", dist_timeout_s=timeout_s, survivor_exit_s=round(exit_s, 1))
