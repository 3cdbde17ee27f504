"""Leftovers of killed runs, swept at start: DeepSpeed's /dev/shm buffers and Prometheus file-SD target files.

A run that ends normally removes both (``distributed.remove_shm_buffers`` at exit, the file-SD file in
``TrainMetrics.close``). A run killed with SIGKILL cannot: its 64 MiB-per-rank shared-memory buffers stay in
RAM until reboot, and its target file keeps Prometheus scraping dead ports. The next run on the machine sweeps
them, touching only what is provably abandoned:

* a buffer file is removed only when no live process maps or holds it open, and it is older than a minute
  (a run starting right now may have created it a moment before mapping it);
* a target file is removed only when none of its targets accepts a connection and it is older than a minute.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_PATTERN = "deepspeed_allreduce_buffer_*"
MIN_AGE_S = 60.0


def _paths_in_use() -> set[str]:
    """Files mapped or held open by any process this user can inspect (/proc/*/maps and /proc/*/fd)."""
    used: set[str] = set()
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6:
                        used.add(parts[5].strip().removesuffix(" (deleted)"))
        except OSError:
            pass
        try:
            for fd in os.listdir(f"{proc}/fd"):
                try:
                    used.add(os.readlink(f"{proc}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            pass
    return used


def sweep_shm_buffers(root: str = "/dev/shm", min_age_s: float = MIN_AGE_S) -> list[str]:
    """Remove DeepSpeed all-reduce buffers no process uses any more; returns what was removed."""
    candidates = [p for p in glob.glob(os.path.join(root, SHM_PATTERN)) if _old(p, min_age_s)]
    if not candidates:
        return []
    used = _paths_in_use()
    removed = []
    for path in candidates:
        if path in used:
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:  # gone meanwhile, or another user's
            pass
    if removed:
        log.info("removed %d shared-memory buffers left by killed runs from %s", len(removed), root)
    return removed


def _old(path: str | Path, min_age_s: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime >= min_age_s
    except OSError:
        return False


def _answers(target: str, timeout_s: float = 0.3) -> bool:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def sweep_file_sd(
    directory: str | Path, keep: str | Path | None = None, min_age_s: float = MIN_AGE_S
) -> list[str]:
    """Remove file-SD target files whose targets all refuse connections; ``keep`` is never removed."""
    removed = []
    for path in sorted(Path(directory).glob("*.json")) if Path(directory).is_dir() else []:
        if keep is not None and path.resolve() == Path(keep).resolve():
            continue
        if not _old(path, min_age_s):
            continue
        try:
            groups = json.loads(path.read_text())
            targets = [t for group in groups for t in group.get("targets", [])]
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # not ours to judge: leave it
        if targets and not any(_answers(t) for t in targets):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    if removed:
        log.info("removed %d Prometheus target files of runs that are gone: %s", len(removed), removed)
    return removed
