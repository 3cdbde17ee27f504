"""Checkpoint-time faults on 1 rank: a failed write (disk full), a NaN/inf loss, SIGTERM in mid-epoch."""

from __future__ import annotations

import signal

import pytest

from tests.faults.conftest import (
    REF_ARGS,
    assert_clean_error,
    checkpoint_step,
    data_position,
    finish,
    latest_checkpoint,
    metrics,
    record,
    run,
    start,
    wait_for_step,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def test_failed_checkpoint_write_keeps_previous_checkpoint(clips_dir, reference, tmp_path):
    """ENOSPC while writing step 4: not published, `latest` stays step 2, resume=auto reproduces the run."""
    run_dir = tmp_path / "run"
    args = [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS]
    rc, out = run("python", args, SSLFER_INJECT_CKPT_FAIL_AT_STEP="4")
    assert_clean_error(
        rc, out, "writing checkpoint step-00000004", "No space left on device", "step-00000002"
    )
    assert checkpoint_step(run_dir) == 2
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002"], names  # the half-written folder was removed
    assert not (run_dir / "backbone.pt").exists()

    rc, out = run("python", [*args, "resume=auto"])
    assert rc == 0, out[-4000:]
    assert "resumed from" in out and "step-00000002" in out
    losses = _losses(run_dir)
    assert losses == reference  # steps 3..6 rerun from step 2: the same batches, bit for bit
    assert data_position(run_dir)["index"] == 6 and checkpoint_step(run_dir) == 6
    record("checkpoint write fails (ENOSPC)", latest_after_failure="step-00000002", resumed_equal=True)


def test_nan_loss_stop_then_skip(clips_dir, reference, tmp_path):
    """nan_policy=stop: clear error, last good checkpoint intact; nan_policy=skip: step skipped and counted."""
    run_dir = tmp_path / "run"
    args = [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS]
    rc, out = run("python", [*args, "nan_policy=stop"], SSLFER_INJECT_NAN_AT_STEP="5")
    line = assert_clean_error(rc, out, "non-finite loss", "step 5", "nan_policy", code=1)
    assert "step-00000004" in line
    assert checkpoint_step(run_dir) == 4
    assert _losses(run_dir) == {s: reference[s] for s in range(1, 5)}  # nothing logged past the good steps

    # The checkpoint left behind is loadable; with skip the same NaN step is skipped and training goes on.
    rc, out = run("python", [*args, "nan_policy=skip"], SSLFER_INJECT_NAN_AT_STEP="5")
    assert rc == 0, out[-4000:]
    assert "resumed from" in out and "step skipped" in out
    lines = metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[4]["loss"] != lines[4]["loss"]  # NaN logged for step 5
    assert lines[-1]["nonfinite_skipped"] == 1 and lines[-1]["loss"] == lines[-1]["loss"]
    # The optimiser did not step on the NaN batch: step 6's LR is the one step 5 would have used.
    assert lines[5]["lr"] == pytest.approx(lines[4]["lr"])
    assert (run_dir / "backbone.pt").exists()
    record("NaN loss (stop, then skip)", injected=2, skipped_steps=1, stop_exit_code=1)


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(clips_dir, reference, tmp_path):
    """SIGTERM at ~step 2 of an 8-step epoch: a checkpoint of the stop step, then resume = uninterrupted run."""
    run_dir = tmp_path / "run"
    args = [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS]
    proc = start("python", args, SSLFER_INJECT_STEP_DELAY_S="0.5")
    wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, timeout=60)
    assert rc == 0, out[-4000:]
    stopped = checkpoint_step(run_dir)
    assert stopped is not None and 2 <= stopped < 6, out[-3000:]
    assert data_position(run_dir)["epoch"] == 0  # in the middle of the first epoch
    assert data_position(run_dir)["index"] == stopped
    assert not (run_dir / "backbone.pt").exists()

    rc, out = run("python", [*args, "resume=auto"])
    assert rc == 0, out[-4000:]
    assert _losses(run_dir) == reference
    assert latest_checkpoint(run_dir).name == "step-00000006"
    record("SIGTERM mid-epoch", stopped_at_step=stopped, resumed_equal=True)
