"""Fault handling of the training program: checks before training, the non-finite loss policy, test hooks.

* :func:`preflight` runs before any process group or model is built: it applies the ``store`` retry policy,
  checks that the dataset (and the checkpoint mirror, for writing) can be reached with the credentials in the
  environment, and checks the config against the dataset's manifest (TimeAug offsets that no clip can hold).
  Problems raise :class:`common.configio.ConfigError` or :class:`data_shards.store.StoreError`, which
  ``launch/pretrain.py`` prints as one line (exit code 2).
* :class:`NonFiniteLossError`: a NaN/inf loss under ``nan_policy=stop``; under ``skip`` the step is skipped
  (no backward, no optimiser step) and counted as ``nonfinite_loss_skipped``.
* :func:`redact`: replaces the secret values of the environment (``AWS_SECRET_ACCESS_KEY``, ...) in a text.

Test-only hooks (environment variables read by the training program; never set them in production):

* ``SSLFER_INJECT_NAN_AT_STEP=K[,K2...]``: the loss of optimiser step K (1-based) becomes NaN on every rank.
* ``SSLFER_INJECT_STEP_DELAY_S=S``: every step sleeps S seconds first (room to kill or signal a run mid-way).
* ``SSLFER_INJECT_CKPT_FAIL_AT_STEP=K``: writing the checkpoint of step K fails with ``ENOSPC`` (disk full)
  after the partial folder was written, before it is published.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from common.errors import ConfigError

log = logging.getLogger(__name__)

INJECT_NAN_ENV = "SSLFER_INJECT_NAN_AT_STEP"
INJECT_CKPT_FAIL_ENV = "SSLFER_INJECT_CKPT_FAIL_AT_STEP"
INJECT_STEP_DELAY_ENV = "SSLFER_INJECT_STEP_DELAY_S"
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SSLFER_STORE_SECRET_KEY")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and ``nan_policy`` is ``stop``; the message names the step and the fix."""


def _steps_from_env(name: str) -> set[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return set()
    return {int(part) for part in raw.split(",") if part.strip()}


def before_step(step: int) -> bool:
    """Test hooks before (1-based) optimiser ``step``: sleep if asked; True if its loss must become NaN."""
    delay = float(os.environ.get(INJECT_STEP_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    return step in _steps_from_env(INJECT_NAN_ENV)


def maybe_fail_checkpoint_write(step: int) -> None:
    """Test hook: simulate a full disk while the checkpoint of ``step`` is written."""
    if step in _steps_from_env(INJECT_CKPT_FAIL_ENV):
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {INJECT_CKPT_FAIL_ENV}={step})")


def redact(text: str) -> str:
    """``text`` with every secret value of the environment replaced by ``***``."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def preflight(cfg) -> None:
    """Everything that can be checked before training starts (see the module docstring)."""
    from data_shards import store

    store.configure(cfg.store)
    urls = [(cfg.data.url, False)]
    if cfg.checkpoint.mirror_url:
        urls.append((cfg.checkpoint.mirror_url, True))
    for url, write in urls:
        if "{" not in url:
            store.check_access(url, write=write)
    check_offsets_fit(cfg)


def max_clip_frames(manifest: dict) -> int:
    """An upper bound of the longest clip: in a shard of n samples and f frames no clip exceeds f - n + 1."""
    return max(
        (int(s["frames"]) - int(s["samples"]) + 1 for s in manifest["shards"] if s["samples"]), default=0
    )


def check_offsets_fit(cfg) -> None:
    """TimeAug needs at least one positive offset shorter than some clip of the dataset."""
    from pretrain.sampling import REFERENCE_FPS, offsets_in_frames

    sampling = cfg.sampling
    if sampling.strategy != "timeaug" or "{" in cfg.data.url:
        return
    from data_shards.read import read_manifest

    manifest = read_manifest(cfg.data.url)
    if manifest.get("kind") != "clips":
        return
    longest = max_clip_frames(manifest)
    fps = float((manifest.get("generator") or {}).get("fps") or REFERENCE_FPS)
    shortest = int(offsets_in_frames(sampling.positive_offsets_s, fps).min())
    if longest and shortest >= longest:
        raise ConfigError(
            f"config key 'sampling.positive_offsets_s': the shortest offset {min(sampling.positive_offsets_s)} s "
            f"is {shortest} frames at {fps:.3g} fps, but no clip of {cfg.data.url} has more than {longest} "
            f"frames: no positive could ever be drawn; use offsets below {longest / fps:.2f} s"
        )
