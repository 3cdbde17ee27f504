"""Fault injection for the fault suite (``tests/faults``): environment variables that make a run fail on purpose.

Test-only: never set these in production. The training program reads them at two points, before every optimiser
step and while a checkpoint is written:

* ``SSLFER_INJECT_NAN_AT_STEP=K[,K2...]``: the loss of optimiser step K (1-based) becomes NaN on every rank.
* ``SSLFER_INJECT_STEP_DELAY_S=S``: every step sleeps S seconds first (room to kill or signal a run mid-way).
* ``SSLFER_INJECT_CKPT_FAIL_AT_STEP=K``: writing the checkpoint of step K fails with ``ENOSPC`` (disk full)
  after the partial folder was written, before it is published.
"""

from __future__ import annotations

import errno
import os
import time

INJECT_NAN_ENV = "SSLFER_INJECT_NAN_AT_STEP"
INJECT_CKPT_FAIL_ENV = "SSLFER_INJECT_CKPT_FAIL_AT_STEP"
INJECT_STEP_DELAY_ENV = "SSLFER_INJECT_STEP_DELAY_S"


def _steps_from_env(name: str) -> set[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return set()
    return {int(part) for part in raw.split(",") if part.strip()}


def before_step(step: int) -> bool:
    """Before (1-based) optimiser ``step``: sleep if asked; True if its loss must become NaN."""
    delay = float(os.environ.get(INJECT_STEP_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    return step in _steps_from_env(INJECT_NAN_ENV)


def maybe_fail_checkpoint_write(step: int) -> None:
    """Simulate a full disk while the checkpoint of ``step`` is written."""
    if step in _steps_from_env(INJECT_CKPT_FAIL_ENV):
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {INJECT_CKPT_FAIL_ENV}={step})")
