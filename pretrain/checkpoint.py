"""Checkpoints: periodic and on SIGTERM/SIGINT, published atomically, resumable bit-exactly.

Layout under ``run_dir/checkpoints``::

    step-00000100/            one published checkpoint (DeepSpeed's files + ours)
        meta.json             step, epoch, world size, ZeRO stage (read before anything is loaded)
        rank-00000.pt ...     per-rank state: RNG states (python, numpy, torch, CUDA), data-stream position
        <DeepSpeed files>     model, optimizer, LR scheduler (+ client_state: step, epoch)
    latest                    text file naming the newest published checkpoint

A checkpoint is written under ``step-XXXXXXXX.partial`` and renamed once every rank has finished, then
``latest`` is replaced (write-temp-then-rename), so a kill at any moment leaves the previous checkpoint intact.
DeepSpeed's own ``latest`` file is not used: it would point at a half-written tag.

A failed write on any rank (disk full, quota, I/O error) is agreed on by all ranks: the partial folder is removed,
nothing is published and :class:`CheckpointError` names the checkpoint that is still the latest. A mirror upload
(``checkpoint.mirror_url``) retries with the ``store`` backoff; if the store stays down the local checkpoint is
already published and the mirror's ``latest`` (uploaded last) still names the previous mirrored checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from common.redact import redact
from pretrain import distributed, fault_injection

log = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as plain values and tensors, so the file loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """Remembers SIGTERM/SIGINT instead of dying, so the loop can save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.received = signum


class Checkpointer:
    """Save/load full training state through a DeepSpeed engine, plus mirror and retention."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, mirror_url: str | None = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.mirror_url = mirror_url

    # ------------------------------------------------------------------ finding checkpoints
    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; when that pointer is missing or names no complete checkpoint, the
        newest complete ``step-*`` folder (said in the log), so a broken pointer never restarts a run."""
        pointer = self.dir / LATEST
        named = self.dir / pointer.read_text().strip() if pointer.is_file() else None
        if named is not None and (named / "meta.json").is_file():
            return named
        complete = sorted(p for p in self.dir.glob("step-*") if (p / "meta.json").is_file())
        if not complete:
            return None
        why = (
            f"'{LATEST}' names {named.name}, which is not a complete checkpoint"
            if named
            else f"no '{LATEST}'"
        )
        log.warning(
            "%s in %s: resuming from the newest complete checkpoint, %s", why, self.dir, complete[-1].name
        )
        return complete[-1]

    def resolve(self, resume: str) -> Path | None:
        """``resume`` setting -> checkpoint folder to load (None: start fresh)."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file() and not (path / "meta.json").is_file():
            path = path / (path / LATEST).read_text().strip()  # a checkpoints/ folder was given
        if not (path / "meta.json").is_file():
            raise CheckpointError(
                f"config key 'resume': '{resume}' is not a checkpoint folder (expected meta.json inside, e.g. "
                "RUN_DIR/checkpoints/step-00001000); use resume=auto to pick the latest one"
            )
        return path

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, epoch: int, rank_state: dict[str, Any], zero_stage: int) -> Path:
        """Collective: every rank must call it. Returns the published folder."""
        tag = tag_for(step)
        partial_tag = tag + PARTIAL_SUFFIX
        rank, world = distributed.get_rank(), distributed.get_world_size()
        partial = self.dir / partial_tag
        if distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a save that was killed
            partial.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        error: OSError | None = None
        try:
            engine.save_checkpoint(
                str(self.dir), tag=partial_tag, client_state={"step": step, "epoch": epoch}, save_latest=False
            )
            torch.save({**rank_state, "rng": rng_state()}, partial / f"rank-{rank:05d}.pt")
            fault_injection.maybe_fail_checkpoint_write(step)  # fault suite only (SSLFER_INJECT_*)
        except OSError as err:  # disk full, quota, I/O error: never publish a half-written checkpoint
            error = err
        if distributed.any_rank(error is not None):
            if distributed.is_main():
                shutil.rmtree(partial, ignore_errors=True)
            distributed.barrier()
            previous = self.latest()
            raise CheckpointError(
                f"writing checkpoint {tag} in {self.dir} failed ({error or 'on another rank'}); it was not "
                f"published and the latest checkpoint is still {previous.name if previous else 'none'}: free "
                "disk space (or fix the folder) and rerun with resume=auto"
            )
        distributed.barrier()
        final = self.dir / tag
        if distributed.is_main():
            meta = {"step": step, "epoch": epoch, "world_size": world, "zero_stage": zero_stage, "tag": tag}
            (partial / "meta.json").write_text(json.dumps(meta, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            _write_atomic(self.dir / LATEST, tag)
            self._prune(keep=tag)
            if self.mirror_url:
                try:
                    self._mirror(final)
                except Exception as err:
                    raise CheckpointError(
                        f"checkpoint {tag} is saved in {self.dir} but mirroring it to {self.mirror_url} failed "
                        f"after retries: {redact(str(err))}. The mirror's '{LATEST}' still names the "
                        "previous mirrored checkpoint; fix the store and rerun with resume=auto"
                    ) from err
        distributed.barrier()
        return final

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        tags = sorted(
            p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX)
        )
        for old in tags[: -self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def _mirror(self, folder: Path) -> None:
        """Copy a published checkpoint to ``mirror_url`` (s3:// or a folder); ``latest`` goes last."""
        try:
            from data_shards import store
        except ImportError:  # pragma: no cover - store is part of the project
            log.warning("checkpoint.mirror_url is set but data_shards.store is unavailable: not mirrored")
            return
        base = store.join(self.mirror_url, folder.name)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                store.put_file(str(path), store.join(base, path.relative_to(folder).as_posix()))
        pointer = self.dir / LATEST
        store.put_file(str(pointer), store.join(self.mirror_url, LATEST))

    # ------------------------------------------------------------------ load
    def check_compatible(self, path: Path, world_size: int, zero_stage: int) -> dict[str, Any]:
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {meta['world_size']} ranks but this run has {world_size}: "
                "the per-rank data position and ZeRO partitions cannot be re-split. Resume with "
                f"{meta['world_size']} ranks, or start a new run_dir (resume=never) with weights from "
                "model.weights_path"
            )
        if meta["zero_stage"] != zero_stage:
            raise CheckpointError(
                f"checkpoint {path} used zero_stage={meta['zero_stage']} but this run has zero_stage="
                f"{zero_stage}: set zero_stage={meta['zero_stage']} to resume"
            )
        return meta

    def load(self, engine, path: Path, world_size: int, zero_stage: int) -> dict[str, Any]:
        """Collective. Loads model/optimizer/scheduler into ``engine``; returns this rank's state + meta."""
        meta = self.check_compatible(path, world_size, zero_stage)
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}")
        rank = distributed.get_rank()
        state = load_rank_state(path / f"rank-{rank:05d}.pt")
        set_rng_state(state.pop("rng"))
        state.update(step=int(client["step"]), epoch=int(client["epoch"]), meta=meta)
        return state


def load_rank_state(rank_file: Path) -> dict[str, Any]:
    """A rank's own training state (stream position, RNG states, counters), read with ``weights_only=True``:
    a file holding anything but plain values and tensors is refused, and nothing in it runs."""
    try:
        state = torch.load(rank_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{rank_file} holds objects other than plain values and tensors, so it is not loaded (a checkpoint "
            "from an older version of the project, or a tampered file); resume from another checkpoint or "
            "start with resume=never"
        ) from err
    if not isinstance(state, dict) or "rng" not in state:
        raise CheckpointError(f"{rank_file} is not a rank state written by this project")
    return state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
