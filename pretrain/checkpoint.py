"""Checkpoints: periodic and on SIGTERM/SIGINT, published atomically, verified before a load, resumed exactly.

Layout under ``run_dir/checkpoints``::

    step-00000100/            one published checkpoint (DeepSpeed's files + ours)
        meta.json             step, epoch, world size, ZeRO stage (read before anything is loaded)
        rank-00000.pt ...     per-rank state: RNG states (python, numpy, torch, CUDA), data-stream position
        <DeepSpeed files>     model, optimizer, LR scheduler (+ client_state: step, epoch)
        checksums.json        every other file of the folder with its size and sha256, written last
    latest                    text file naming the newest published checkpoint

Saving: every rank writes its files under ``step-XXXXXXXX.partial``; the ranks agree that every write succeeded;
the files are hashed (each rank a share) and fsynced, ``meta.json`` and then ``checksums.json`` are written; the
folder is fsynced and renamed into place (an existing folder of the same step is first renamed aside to
``step-XXXXXXXX.replaced`` and deleted only once the new one is in place), then ``latest`` is replaced
(write-temp, fsync, rename, fsync the folder). A kill at any moment leaves a complete checkpoint to resume from.
DeepSpeed's own ``latest`` file is not used: it would point at a half-written tag.

A failed write on any rank (disk full, quota, I/O error; ``torch.save`` reports a full disk as a RuntimeError,
which is caught too) is agreed on by all ranks: the partial folder is removed, nothing is published and
:class:`CheckpointError` names the checkpoint that is still the latest. A mirror upload
(``checkpoint.mirror_url``) retries with the ``store`` backoff; if the store stays down the local checkpoint is
already published and the mirror's ``latest`` (uploaded last) still names the previous mirrored checkpoint.

Loading (trust model, docs/faults.md): the folder's files must be exactly those ``checksums.json`` lists, with
their sizes and sha256, before anything in it is read; every ``.pt`` file must unpickle with torch's restricted
(``weights_only``) unpickler -- ours with plain values and tensors only, DeepSpeed's with in addition the few
DeepSpeed types its optimizer states hold (:data:`DEEPSPEED_GLOBALS`) -- before DeepSpeed, which unpickles
without restriction, is handed the folder. ``resume=auto`` takes the checkpoint ``latest`` names, or, when that
is missing or fails verification, the newest checkpoint that verifies (one log line says which and why).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import os
import pickle
import random
import re
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
INDEX = "checksums.json"
META = "meta.json"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"  # the previous folder of a re-saved step, until the new one is in place
_TAG = re.compile(r"step-(\d{8,})")
_CHUNK = 8 << 20
_LOW_SPACE_BYTES = 1 << 20  # a failed write with less than this left on the file system is a full disk

# The only non-torch types DeepSpeed's checkpoint files may hold (ZeRO 1/2 optimizer states, fp32 and bf16), by
# exact name. Anything else in one of its files is refused before DeepSpeed (which unpickles without
# restriction) sees it; a DeepSpeed upgrade that stores another type makes resume refuse, naming it: add it here
# once you have checked it is a plain data class.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""

    #: True where every rank raises this same error at the same point (a save's agreed failure path), so the
    #: launcher may wait for all of them to report before any exits.
    every_rank: bool = False


class AgreedCheckpointError(CheckpointError):
    """A save failed and every rank agreed on it (a collective decided it): each rank raises this."""

    every_rank = True


class _Refused(Exception):
    """A checkpoint fails verification. ``hostile``: its files are intact (checksums match) but one holds
    objects a checkpoint written by this project never holds -- refused, never skipped over silently."""

    def __init__(self, message: str, hostile: bool = False):
        super().__init__(message)
        self.hostile = hostile


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(name: str) -> int | None:
    match = _TAG.fullmatch(name)
    return int(match.group(1)) if match else None


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
        self._verified: set[Path] = set()  # folders verified by this process (load() skips re-hashing them)

    # ------------------------------------------------------------------ finding checkpoints
    def _named(self) -> tuple[str | None, Path | None]:
        """(what ``latest`` holds, the folder it names if it is a checkpoint name); (None, None) without it."""
        pointer = self.dir / LATEST
        try:
            text = pointer.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        except (OSError, UnicodeDecodeError) as err:
            return f"<unreadable: {err}>", None
        return text, (self.dir / text if _step_of(text) is not None else None)

    def _candidates(self) -> list[Path]:
        """Checkpoint folders, newest first: ``step-*`` exactly, plus a ``.replaced`` folder whose step has no
        folder (a kill between the two renames of a re-save)."""
        found: dict[int, Path] = {}
        if not self.dir.is_dir():
            return []
        for path in self.dir.iterdir():
            name = path.name.removesuffix(REPLACED_SUFFIX)
            step = _step_of(name)
            if step is None or not path.is_dir():
                continue
            if path.name == name or not (self.dir / name).is_dir():
                found[step] = path
        return [found[step] for step in sorted(found, reverse=True)]

    def latest(self) -> Path | None:
        """The newest checkpoint that looks complete (``meta.json`` and ``checksums.json`` in it), preferring
        the one ``latest`` names. Cheap and local (no hashing, no collective): for messages; loading goes
        through :meth:`resolve`, which verifies."""
        _, named = self._named()
        if named is not None and _looks_complete(named):
            return named
        return next((p for p in self._candidates() if _looks_complete(p)), None)

    def resolve(self, resume: str) -> Path | None:
        """Collective. ``resume`` setting -> a verified checkpoint folder to load (None: start fresh)."""
        if resume == "never":
            return None
        if resume == "auto":
            return self._resolve_auto()
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file() and not (path / META).is_file():
            name = (path / LATEST).read_text().strip()  # a checkpoints/ folder was given
            if _step_of(name) is not None:
                path = path / name
        if not (path / META).is_file():
            raise CheckpointError(
                f"config key 'resume': '{resume}' is not a checkpoint folder (expected {META} inside, e.g. "
                "RUN_DIR/checkpoints/step-00001000); use resume=auto to pick the latest one"
            )
        refused = self._verify(path)
        if refused is not None:
            raise _refusal(path, refused, fallback_hint=True)
        return path

    def _resolve_auto(self) -> Path | None:
        if self.mirror_url:
            self._fetch_newer_mirrored()
        # Rank 0 lists, every rank walks the same list: verification is collective.
        text, named = self._named() if distributed.is_main() else (None, None)
        names = [p.name for p in self._candidates()] if distributed.is_main() else []
        text, named_name, names = distributed.broadcast_object(
            (text, named.name if named is not None else None, names)
        )
        order = names
        if named_name is not None and named_name in names:
            order = [named_name, *(n for n in names if n != named_name)]
        if text is None:
            why = [f"there is no '{LATEST}'"]
        elif named_name is None:
            why = [f"'{LATEST}' holds {text[:80]!r}, which is not a checkpoint name"]
        elif named_name not in names:
            why = [f"'{LATEST}' names {named_name}, which does not exist"]
        else:
            why = []
        if not order:
            if text is not None and distributed.is_main():
                log.warning("resume=auto: %s and %s holds no checkpoint: starting fresh", why[0], self.dir)
            return None
        for name in order:
            path = self.dir / name
            refused = self._verify(path)
            if refused is None:
                if why and distributed.is_main():
                    log.warning(
                        "resume=auto: resuming from %s, the newest checkpoint that verifies, because %s",
                        path,
                        "; ".join(why),
                    )
                return path
            if refused.hostile:  # tampered with, not torn: stop here rather than quietly use an older one
                raise _refusal(path, refused, fallback_hint=False)
            what = f"'{LATEST}' names {name}, which" if name == named_name else name
            why.append(f"{what} failed verification: {refused}")
        raise CheckpointError(
            f"resume=auto: no checkpoint in {self.dir} passed verification ({'; '.join(why)}). Restore a good "
            "copy (e.g. from checkpoint.mirror_url), or start over with resume=never"
        )

    def _fetch_newer_mirrored(self) -> None:
        """Every rank: when the mirror's ``latest`` names a checkpoint newer than any in this rank's own
        ``run_dir/checkpoints`` (a node that joined a cluster without shared storage, or a run directory that
        was lost), copy it here so that the usual collective verification and load can use it. The copy goes
        to a private folder renamed into place, so ranks sharing a file system do not collide; the mirror is
        trusted no more than the local disk: its files are verified against its index like any checkpoint."""
        try:
            from data_shards import store

            name = store.read_bytes(store.join(self.mirror_url, LATEST)).decode().strip()
        except Exception as err:  # no mirror yet, or unreachable: resume from what is local
            log.info("resume=auto: no checkpoint fetched from %s (%s)", self.mirror_url, redact(str(err)))
            return
        step = _step_of(name)
        local = [_step_of(p.name.removesuffix(REPLACED_SUFFIX)) for p in self._candidates()]
        if step is None or (local and max(local) >= step) or (self.dir / name).exists():
            return
        rank = distributed.get_rank()
        staging = self.dir / f"{name}.fetching-{rank}-{os.getpid()}"
        try:
            base = store.join(self.mirror_url, name)
            staging.mkdir(parents=True)
            index_bytes = store.read_bytes(store.join(base, INDEX))
            (staging / INDEX).write_bytes(index_bytes)
            for rel in sorted(_read_index(staging)):  # names checked there: no absolute paths, no '..'
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with store.open_url(store.join(base, rel)) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            try:
                staging.rename(self.dir / name)
            except OSError:  # another rank on this file system published it first
                pass
            else:  # ``latest`` follows, so an older local checkpoint it named is not preferred
                pointer = self.dir / f"{LATEST}.fetching-{rank}-{os.getpid()}"
                pointer.write_text(name)
                pointer.replace(self.dir / LATEST)
                log.warning("resume=auto: fetched %s from the mirror %s (newer than any local checkpoint)",
                            name, self.mirror_url)  # fmt: skip
        except Exception as err:  # a bad or unreachable mirror: what is local still resumes
            log.warning(
                "resume=auto: could not fetch %s from %s: %s", name, self.mirror_url, redact(str(err))
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ verification
    def _verify(self, path: Path) -> _Refused | None:
        """Collective: None if ``path`` holds exactly the files its index lists, with their sizes and sha256,
        and every ``.pt`` file unpickles with the restricted unpickler; else the first problem found. Every
        rank checks the listing and hashes a share of the files; nothing is loaded."""
        rank, world = distributed.get_rank(), distributed.get_world_size()
        problem: tuple[str, bool] | None = None
        index: dict[str, dict[str, Any]] = {}
        try:
            index = _read_index(path)
            _check_listing(path, index)
            for name in sorted(index)[rank::world]:
                size, digest = _hash_file(path / name)
                if size != index[name]["size"]:
                    raise _Refused(f"{path / name} has {size} bytes but {INDEX} lists {index[name]['size']}")
                if digest != index[name]["sha256"]:
                    raise _Refused(
                        f"{path / name} does not match its sha256 in {INDEX} (changed or corrupted)"
                    )
        except _Refused as err:
            problem = (str(err), False)
        except OSError as err:
            problem = (f"{path} could not be read ({err})", False)
        problem = _first(distributed.all_gather_object(problem))
        if problem is None:  # intact: now what the files hold (pickles), each rank its share again
            try:
                for name in sorted(n for n in index if n.endswith(".pt"))[rank::world]:
                    _check_pickle(path / name)
            except _Refused as err:
                problem = (str(err), err.hostile)
            problem = _first(distributed.all_gather_object(problem))
        if problem is not None:
            return _Refused(problem[0], hostile=problem[1])
        self._verified.add(path)
        return None

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, epoch: int, rank_state: dict[str, Any], zero_stage: int) -> Path:
        """Collective: every rank must call it. Returns the published folder."""
        tag = tag_for(step)
        partial_tag = tag + PARTIAL_SUFFIX
        rank, world = distributed.get_rank(), distributed.get_world_size()
        main = distributed.is_main()
        partial = self.dir / partial_tag
        final = self.dir / tag

        # 1. Every rank writes its files; a failed write anywhere is agreed on before anything is published.
        error: str | None = None
        if main:
            try:
                self._clean_leftovers()  # of saves that were killed
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                error = str(err)
        error = _first(distributed.all_gather_object(error))
        if error is None:
            with _GuardedWrites(engine, partial) as guard:
                try:
                    engine.save_checkpoint(
                        str(self.dir), tag=partial_tag, client_state={"step": step, "epoch": epoch},
                        save_latest=False,
                    )  # fmt: skip
                except (OSError, RuntimeError) as err:
                    guard.failed(err, partial)
            try:
                if guard.error is not None:
                    raise guard.error
                rank_file = partial / f"rank-{rank:05d}.pt"
                _torch_save({**rank_state, "rng": rng_state()}, rank_file)
                _fsync_path(rank_file)
                fault_injection.maybe_fail_checkpoint_write(step)  # fault suite only (SSLFER_INJECT_*)
            except OSError as err:  # disk full, quota, I/O error: never publish a half-written checkpoint
                error = f"rank {rank}: {err}"
            error = _first(distributed.all_gather_object(error))
        if error is not None:
            self._abandon(partial, tag, error)

        # 2. meta.json, then every file hashed and fsynced (a share per rank), then the index, last.
        listing: list[str] | str = []
        if main:
            try:
                _write_durable(partial / META, json.dumps(
                    {"step": step, "epoch": epoch, "world_size": world, "zero_stage": zero_stage, "tag": tag},
                    indent=2,
                ))  # fmt: skip
                listing = sorted(_files_under(partial))
            except (OSError, _Refused) as err:
                listing = f"rank 0: {err}"
        listing = distributed.broadcast_object(listing)
        if isinstance(listing, str):
            self._abandon(partial, tag, listing)
        entries: dict[str, dict[str, Any]] | str = {}
        try:
            for name in listing[rank::world]:
                size, digest = _hash_file(partial / name, fsync=True)
                entries[name] = {"size": size, "sha256": digest}
        except OSError as err:
            entries = f"rank {rank}: {err}"
        gathered = distributed.all_gather_object(entries)
        error = next((e for e in gathered if isinstance(e, str)), None)
        if error is not None:
            self._abandon(partial, tag, error)

        # 3. Rank 0 writes the index and publishes: rename aside, rename into place, latest, delete the old one.
        publish_failure: str | None = None
        if main:
            try:
                index = {k: v for part in gathered for k, v in sorted(part.items())}
                _write_durable(
                    partial / INDEX, json.dumps({"format": 1, "files": index}, indent=1, sort_keys=True)
                )
                for folder in _dirs_under(partial):
                    _fsync_dir(folder)
            except OSError as err:
                error = f"rank 0: {err}"
            if error is None:
                try:
                    self._publish(partial, final, tag)
                except OSError as err:
                    shutil.rmtree(partial, ignore_errors=True)
                    publish_failure = (
                        f"publishing checkpoint {tag} in {self.dir} failed ({err}); the latest usable "
                        f"checkpoint is {_name(self.latest())}: fix the folder and rerun with resume=auto"
                    )
        error, publish_failure = distributed.broadcast_object((error, publish_failure))
        if error is not None:
            self._abandon(partial, tag, error)
        if publish_failure is not None:
            raise AgreedCheckpointError(publish_failure)

        # 4. Retention and the mirror (rank 0), agreed on like the rest.
        failure: str | None = None
        if main:
            self._prune(keep=tag)
            if self.mirror_url:
                try:
                    self._mirror(final)
                except Exception as err:
                    failure = (
                        f"checkpoint {tag} is saved in {self.dir} but mirroring it to {self.mirror_url} failed "
                        f"after retries: {redact(str(err))}. The mirror's '{LATEST}' still names the "
                        "previous mirrored checkpoint; fix the store and rerun with resume=auto"
                    )
        failure = distributed.broadcast_object(failure)
        if failure is not None:
            raise AgreedCheckpointError(failure)
        return final

    def _abandon(self, partial: Path, tag: str, error: str) -> None:
        """Collective: the agreed failure path. Removes the partial folder, raises on every rank."""
        if distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        distributed.barrier()
        raise AgreedCheckpointError(
            f"writing checkpoint {tag} in {self.dir} failed ({error}); it was not published and the latest "
            f"checkpoint is still {_name(self.latest())}: free disk space (or fix the folder) and rerun with "
            "resume=auto"
        )

    def _publish(self, partial: Path, final: Path, tag: str) -> None:
        """Rank 0: ``partial`` (complete, fsynced) becomes ``final``; the old ``final`` goes only afterwards."""
        aside = final.with_name(final.name + REPLACED_SUFFIX)
        replacing = final.exists()
        if replacing:
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        try:
            os.rename(partial, final)
        except OSError:
            if replacing:
                os.rename(aside, final)
            raise
        _fsync_dir(self.dir)
        _write_atomic(self.dir / LATEST, tag)
        if replacing:
            shutil.rmtree(aside, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        """Rank 0, before a save: partial folders of killed saves go; a ``.replaced`` folder goes once its
        step's new folder is in place, or is moved back when the kill came between the two renames."""
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            if not path.is_dir():
                continue
            if path.name.endswith(PARTIAL_SUFFIX) and _step_of(path.name.removesuffix(PARTIAL_SUFFIX)):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.endswith(REPLACED_SUFFIX):
                final = self.dir / path.name.removesuffix(REPLACED_SUFFIX)
                if _step_of(final.name) is None:
                    continue
                if final.exists():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.rename(path, final)
        (self.dir / (LATEST + ".tmp")).unlink(missing_ok=True)

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        tags = sorted(
            (p for p in self.dir.iterdir() if p.is_dir() and _step_of(p.name) is not None),
            key=lambda p: _step_of(p.name),
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
        meta = json.loads((path / META).read_text())
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
        """Collective. Verifies ``path`` (unless :meth:`resolve` just did), reads this rank's own state, then
        hands the folder to DeepSpeed; returns this rank's state + meta."""
        if path not in self._verified:
            refused = self._verify(path)
            if refused is not None:
                raise _refusal(path, refused, fallback_hint=True)
        meta = self.check_compatible(path, world_size, zero_stage)
        rank = distributed.get_rank()
        state: dict[str, Any] | None = None
        problem: str | None = None
        try:
            state = load_rank_state(path / f"rank-{rank:05d}.pt")
        except CheckpointError as err:
            problem = str(err)
        problem = _first(distributed.all_gather_object(problem))
        if problem is not None:  # on every rank, before DeepSpeed reads anything
            raise CheckpointError(problem)
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}")
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
    except Exception as err:  # not a torch file at all (truncated, garbage): refused the same way
        raise CheckpointError(
            f"{rank_file} is not a readable rank state ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or "rng" not in state:
        raise CheckpointError(f"{rank_file} is not a rank state written by this project")
    return state


# ---------------------------------------------------------------------- helpers: verification
def _first(items: list[Any]) -> Any:
    return next((item for item in items if item is not None), None)


def _name(path: Path | None) -> str:
    return path.name if path is not None else "none"


def _refusal(path: Path, refused: _Refused, fallback_hint: bool) -> CheckpointError:
    if refused.hostile:
        return CheckpointError(
            f"checkpoint {path} is refused: {refused}. Nothing from it was loaded. Resume only from "
            "checkpoints your own runs wrote; move this folder away to resume from an older one, or start with "
            "resume=never"
        )
    hint = " (resume=auto takes the newest one that verifies)" if fallback_hint else ""
    return CheckpointError(
        f"checkpoint {path} failed verification: {refused}. Resume from another checkpoint{hint}, restore a "
        "good copy, or start with resume=never"
    )


def _looks_complete(path: Path) -> bool:
    return (path / META).is_file() and (path / INDEX).is_file()


def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every file below ``folder`` (the index excluded); symlinks and other
    non-regular entries are reported as such, since nothing in a checkpoint should be one."""
    names = []
    for root, dirs, files in os.walk(folder):
        for entry in [*dirs, *files]:
            full = Path(root) / entry
            if full.is_symlink() or not (full.is_dir() or full.is_file()):
                raise _Refused(f"{full} is not a regular file or folder")
        for entry in files:
            rel = (Path(root) / entry).relative_to(folder).as_posix()
            if rel != INDEX:
                names.append(rel)
    return names


def _dirs_under(folder: Path) -> list[Path]:
    return [Path(root) for root, _, _ in os.walk(folder)]


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    index_file = path / INDEX
    if not index_file.is_file():
        raise _Refused(
            f"{index_file} is missing (a save that did not finish, or a checkpoint written by an older version "
            "of the project, whose files cannot be verified)"
        )
    try:
        files = json.loads(index_file.read_text())["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        for name, entry in files.items():
            parts = Path(name).parts
            if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or name == INDEX:
                raise ValueError(f"bad file name {name!r}")
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                    and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):  # fmt: skip
                raise ValueError(f"bad entry for {name!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise _Refused(f"{index_file} is not a valid checksum index ({err})") from None
    return files


def _check_listing(path: Path, index: dict[str, dict[str, Any]]) -> None:
    present = _files_under(path)
    unlisted = sorted(set(present) - set(index))
    if unlisted:
        raise _Refused(f"{path / unlisted[0]} is not listed in {INDEX}")
    missing = sorted(set(index) - set(present))
    if missing:
        raise _Refused(f"{path / missing[0]} is listed in {INDEX} but missing")
    for name in sorted(index):
        size = (path / name).stat().st_size
        if size != index[name]["size"]:
            raise _Refused(f"{path / name} has {size} bytes but {INDEX} lists {index[name]['size']}")


def _hash_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def _deepspeed_globals() -> list[Any]:
    found = []
    for dotted in DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that type is simply not allowed
            continue
    return found


def _check_pickle(path: Path) -> None:
    """Unpickle ``path`` with torch's restricted unpickler (tensors memory-mapped, not read): ours may hold
    plain values and tensors only, DeepSpeed's also :data:`DEEPSPEED_GLOBALS`. Nothing in the file runs."""
    ours = re.fullmatch(r"rank-\d+\.pt", path.name) is not None
    allowed = [] if ours else _deepspeed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # Torch's legacy (non-zip) format cannot be memory-mapped: the same check, data read.
                torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to word the message
            unsafe = []
        unsafe = [g for g in unsafe if ours or g not in DEEPSPEED_GLOBALS]
        what = f" ({', '.join(unsafe[:5])})" if unsafe else ""
        allowed_note = "" if ours else " (DeepSpeed types allowed: pretrain.checkpoint.DEEPSPEED_GLOBALS)"
        raise _Refused(
            f"{path} holds objects other than tensors and plain values{what}, which a checkpoint of this "
            f"project never holds{allowed_note}",
            hostile=True,
        ) from None
    except Exception as err:  # noqa: BLE001 - not a torch zip file: nothing DeepSpeed or we could load
        raise _Refused(
            f"{path} is not a readable torch file ({type(err).__name__}: {err})", hostile=True
        ) from None


# ---------------------------------------------------------------------- helpers: durable writes
class _GuardedWrites:
    """While DeepSpeed saves: a failed write inside its checkpoint engine is recorded instead of raised, so
    every rank still runs DeepSpeed's collectives (its barriers) and the failure is agreed on afterwards. Later
    writes of the same save are skipped. Engines without a ``checkpoint_engine`` are left as they are."""

    def __init__(self, engine, folder: Path):
        self.error: OSError | None = None
        self.folder = folder
        self._patched: list[tuple[Any, str, bool, Any]] = []
        self._targets = [
            (getattr(engine, "checkpoint_engine", None), "save"),
            (engine, "_copy_recovery_script"),
        ]

    def failed(self, err: BaseException, folder: Path) -> None:
        if self.error is None:
            self.error = _write_error(err, folder)

    def __enter__(self) -> _GuardedWrites:
        for obj, name in self._targets:
            original = getattr(obj, name, None) if obj is not None else None
            if not callable(original):
                continue

            def guarded(*args, _original=original, **kwargs):
                if self.error is not None:
                    return None
                try:
                    return _original(*args, **kwargs)
                except (OSError, RuntimeError) as err:
                    self.failed(err, self.folder)
                    return None

            try:
                own = vars(obj)
            except TypeError:  # no __dict__ (slots): cannot be guarded, left as it is
                continue
            self._patched.append((obj, name, name in own, own.get(name)))
            setattr(obj, name, guarded)
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, had_own, own in reversed(self._patched):
            if had_own:
                setattr(obj, name, own)
            else:
                delattr(obj, name)


def _write_error(err: BaseException, folder: Path) -> OSError:
    """An OSError for a failed write. ``torch.save`` reports a full disk as ``RuntimeError`` (``unexpected
    pos``/``file write failed``, no errno): with the file system (nearly) full it becomes ENOSPC."""
    if isinstance(err, OSError):
        return err
    try:
        st = os.statvfs(folder if folder.exists() else folder.parent)
        full = st.f_bavail * st.f_frsize < _LOW_SPACE_BYTES or (st.f_files and st.f_favail == 0)
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, f"No space left on device (torch.save: {err})", str(folder))
    return OSError(errno.EIO, f"write failed ({type(err).__name__}: {err})", str(folder))


def _torch_save(obj: Any, path: Path) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        raise _write_error(err, path.parent) from err


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_path(path)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_durable(tmp, text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
