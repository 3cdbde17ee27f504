"""Write samples into WebDataset tar shards plus a ``manifest.json`` written last (the commit point).

Each shard is built in a local temporary file, then published whole (atomic rename for local folders,
upload for ``s3://``). If the writer fails, no manifest is written: the dataset at the URL stays as it was
(the previous version, if any, is still committed and readable) and the shards this writer published are removed.

**Concurrent writers (one write = one version).** Two writers aimed at the same folder/prefix must never commit a
manifest whose shards were overwritten by the other (the manifest would list sha256s its shards do not have).
We chose *a fresh version per write* over a lock: a lock must be released by its holder, so a writer killed
mid-write leaves a stale lock that blocks every later write until someone removes it by hand, and a lock does
not keep the old version readable while the new one is written. Instead:

* **Shard names are never shared by two writes.** The writer first tries to *claim* the plain names
  (``shard-000000.tar``, ...) by creating ``shard-000000.tar`` only if it does not exist (``O_EXCL`` locally, a
  conditional ``PUT`` with ``If-None-Match: *`` on S3). Whoever creates it owns every plain name until that file
  is deleted (which its owner, or a later commit that replaces its version, does last). Any other writer names
  its shards ``shard-<write_id>-NNNNNN.tar``, ``write_id`` being a random 48-bit tag of that writer. A fresh
  prefix therefore gets the familiar plain names; a rewrite of an existing dataset gets tagged ones. Nothing
  ever overwrites a shard another writer published, and no shard is visible to readers until a manifest that
  lists it is committed.
* **The manifest is the single commit point, written last with a compare-and-swap** against the version the
  writer saw when it started: on S3 a conditional ``PUT`` (``If-Match: <ETag seen>``, or ``If-None-Match: *``
  when there was none); locally, under an exclusive ``flock`` of the folder, a check that ``manifest.json`` still
  has the bytes seen at the start, then an atomic rename. The first writer to commit wins; a writer whose base
  version was replaced meanwhile gets :class:`ConcurrentWriteError` (naming the URL and the other write), removes
  the shards it published and commits nothing. So the final manifest always lists exactly its own write's shards,
  with their sha256, whichever writer won.
* After a commit, the shards of the version it replaced are deleted (``keep_replaced=True`` keeps them), the
  plain ``shard-000000.tar`` last, so the plain names are free again only once nothing of that version is left.
  A reader still streaming the replaced version then fails with a missing-shard error instead of reading a
  mix: write a new prefix instead of rewriting one that a run is reading.

Datasets written before this scheme (plain names, no ``write_id``) read as before; rewriting one over them
writes tagged shards and deletes the old ones after the commit. An S3 store that ignores conditional requests is
detected (a probe object written twice with ``If-None-Match: *``); then every write uses tagged names (still never
mixed: the last manifest written lists only its own shards) and a warning says that a losing writer cannot be
told. Local folders rely on ``O_EXCL``, ``flock`` and ``rename``, which a local filesystem honours (network
filesystems may not implement ``flock``: then a warning, and the commit is only atomic, not checked).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_shards import store
from data_shards.dali_index import write_index
from data_shards.manifest import KINDS, MANIFEST_NAME, ShardEntry, build_manifest, shard_name
from data_shards.read import EXACT_LANDMARKS_MEMBER, LANDMARKS_MEMBER, SkipCounter

log = logging.getLogger(__name__)
PLAIN_CLAIM = shard_name(0)  # creating this file claims every plain shard name of the prefix


class ConcurrentWriteError(store.StoreError):
    """Another writer committed the dataset at this URL while this writer was writing: nothing was committed.

    The message names the URL, both writes and the fix. The winner's version is intact and consistent."""


class ClipLike(Protocol):
    key: str
    frames: list[np.ndarray]
    meta: dict[str, Any]


class FrameLike(Protocol):
    key: str
    image: np.ndarray
    meta: dict[str, Any]


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """HxWx3 (or HxW) uint8 array -> JPEG bytes."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------- commit-point helpers (local and S3)


@dataclass
class _Version:
    """The committed manifest a writer started from: its token (S3 ETag / sha256 of the local bytes), shards."""

    token: str
    shard_names: list[str] = field(default_factory=list)
    write_id: str | None = None


def _parse_version(token: str, raw: bytes) -> _Version:
    try:
        manifest = json.loads(raw)
        names = [str(s["name"]) for s in manifest.get("shards", [])]
        write_id = manifest.get("write_id")
    except Exception:  # noqa: BLE001 - a malformed manifest is still a version to replace; nothing to delete
        names, write_id = [], None
    return _Version(token, [n for n in names if n and "/" not in n and not n.startswith(".")], write_id)


def _s3_key(url: str) -> tuple[str, str]:
    bucket, _, key = store._s3_path(url).partition("/")
    return bucket, key


def _s3_call(method: str, url: str, write: bool = False, **kwargs) -> dict[str, Any]:
    fs = store._filesystem()
    bucket, key = _s3_key(url)
    return store._with_retries(lambda: fs.call_s3(method, Bucket=bucket, Key=key, **kwargs), url, write=write)


def _precondition_failed(err: BaseException) -> bool:
    return store._error_code(err) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _committed_version(url: str) -> _Version | None:
    """The manifest committed at ``url`` now (None: none), read so that token and content belong together."""
    manifest_url = store.join(url, MANIFEST_NAME)
    if not store.is_s3(url):
        try:
            raw = Path(manifest_url).read_bytes()
        except FileNotFoundError:
            return None
        return _parse_version(hashlib.sha256(raw).hexdigest(), raw)
    for _ in range(5):
        try:
            before = _s3_call("head_object", manifest_url)["ETag"]
            raw = store.read_bytes(manifest_url)
            after = _s3_call("head_object", manifest_url)["ETag"]
        except FileNotFoundError:
            return None
        if before == after:
            return _parse_version(after, raw)
    return _parse_version(after, raw)  # rewritten all the time: the commit's check will settle it


_CONDITIONAL_S3: dict[tuple[str | None, str], bool] = {}
_conditional_lock = threading.Lock()


def _conditional_writes(url: str) -> bool:
    """Whether the store honours create-only / compare-and-swap writes (always for local folders; S3: probed once
    per endpoint and bucket by writing a probe object twice with ``If-None-Match: *``)."""
    if not store.is_s3(url):
        return True
    cache_key = (store.endpoint(), _s3_key(url)[0])
    with _conditional_lock:
        if cache_key in _CONDITIONAL_S3:
            return _CONDITIONAL_S3[cache_key]
    probe = store.join(url, f".conditional-probe-{uuid.uuid4().hex[:8]}")
    try:
        _s3_call("put_object", probe, write=True, Body=b"1", IfNoneMatch="*")
        try:
            _s3_call("put_object", probe, write=True, Body=b"2", IfNoneMatch="*")
            supported = False
        except OSError as err:
            if not _precondition_failed(err):
                raise
            supported = True
    except store.StoreError:
        raise
    except OSError as err:
        log.debug("conditional-write probe at %s failed: %s", url, err)
        supported = False
    finally:
        store.remove(probe)
    if not supported:
        log.warning(
            "the S3 store at %s ignores conditional writes (If-None-Match/If-Match): concurrent writers to one "
            "dataset prefix cannot be detected there. Each write still gets its own shard names and its manifest "
            "lists only them (the last writer wins), but a losing writer is not told.",
            store.endpoint() or "(AWS default)",
        )
    with _conditional_lock:
        _CONDITIONAL_S3[cache_key] = supported
    return supported


def _create_only(data: bytes, url: str) -> bool:
    """Create ``url`` holding ``data`` unless it exists; True if this call created it."""
    if store.is_s3(url):
        try:
            _s3_call("put_object", url, write=True, Body=data, IfNoneMatch="*")
        except OSError as err:
            if _precondition_failed(err):
                return False
            raise
        return True
    path = Path(url)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Exclusive ``flock`` of a local folder (threads and processes alike); a warning where unsupported."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as err:
            log.warning(
                "cannot lock %s (%s): committing its manifest without the concurrent-writer check",
                folder,
                err,
            )
        yield locked
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _conflict(url: str, write_id: str, base: _Version | None, now: _Version | None) -> ConcurrentWriteError:
    if now is None:
        what, there = "its manifest.json was removed", "nothing is committed there now"
    else:
        other = f"write {now.write_id}" if now.write_id else "another writer"
        what, there = (
            f"{other} committed manifest.json",
            "the dataset there is that write's, complete and consistent",
        )
    started = f"version {base.write_id or base.token[:12]}" if base is not None else "no committed version"
    return ConcurrentWriteError(
        f"concurrent write to {url}: {what} while this writer (write {write_id}, started from {started}) was "
        f"writing, so this write was not committed and its shards were removed; {there}. Let one writer own a "
        "prefix: write to a separate prefix, or re-run after the other writer has finished"
    )


def _commit(url: str, payload: bytes, base: _Version | None, write_id: str, conditional: bool) -> None:
    """Write the manifest if the committed version is still ``base`` (compare-and-swap); else raise a conflict."""
    manifest_url = store.join(url, MANIFEST_NAME)
    if not store.is_s3(url):
        with _folder_lock(Path(url)):
            now = _committed_version(url)
            if (now.token if now else None) != (base.token if base else None):
                raise _conflict(url, write_id, base, now)
            store.put_bytes(payload, manifest_url)
        return
    if not conditional:
        store.put_bytes(payload, manifest_url)
        return
    condition = {"IfMatch": base.token} if base is not None else {"IfNoneMatch": "*"}
    try:
        _s3_call(
            "put_object", manifest_url, write=True, Body=payload, ContentType="application/json", **condition
        )
    except (
        OSError
    ) as err:  # s3fs raises a failed precondition as OSError; If-Match on a gone key may be a 404
        if not (_precondition_failed(err) or isinstance(err, FileNotFoundError)):
            raise
        now = _committed_version(url)
        if now is not None and now.write_id == write_id:
            return  # a retried PUT whose first attempt had landed
        raise _conflict(url, write_id, base, now) from None


def index_url(shard_url: str) -> str:
    """Where a ``.tar`` shard's DALI index lives: beside it, ``.idx`` for ``.tar``."""
    return shard_url[: -len(".tar")] + ".idx"


def _remove_all(urls: list[str], why: str) -> None:
    """Delete ``urls`` in order, best effort (a failure is logged, the rest still tried)."""
    for url in urls:
        try:
            store.remove(url)
        except Exception as err:  # noqa: BLE001 - cleanup must not hide the error being handled
            log.warning("could not remove %s (%s): %s", url, why, err)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_members(kind: str, key: str, jpegs: list[bytes] | bytes, meta: dict[str, Any]):
    """The tar members of one sample (clip JPEGs named by ``frame_indices``, or one frame; landmarks as
    ``.npy``; the JSON), its frame count and its size in the tar; shared by every shard writer."""
    sample: dict[str, Any] = {"__key__": key}
    if kind == "clips":
        if isinstance(jpegs, bytes | bytearray):
            raise TypeError("a clips writer needs a list of JPEG bytes per sample")
        indices = list(meta.get("frame_indices") or range(len(jpegs)))
        if len(indices) != len(jpegs):
            raise ValueError(
                f"sample {key}: {len(jpegs)} frames but {len(indices)} frame_indices in its meta"
            )
        for index, jpeg in zip(indices, jpegs):
            sample[f"{int(index):04d}.jpg"] = bytes(jpeg)
        frames = len(jpegs)
    else:
        if not isinstance(jpegs, bytes | bytearray):
            raise TypeError("a frames writer needs one JPEG (bytes) per sample")
        sample["jpg"] = bytes(jpegs)
        frames = 1
    if kind == "clips" and meta.get("landmarks_exact") is not None:
        # Evaluation-only exact landmarks (SynthFace) as their own member: training never parses them.
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(meta["landmarks_exact"], dtype=np.float32), allow_pickle=False)
        sample[EXACT_LANDMARKS_MEMBER] = buffer.getvalue()
        meta = {k: v for k, v in meta.items() if k != "landmarks_exact"}
    if kind == "clips" and meta.get("landmarks") is not None:
        # Per-frame landmarks as binary float32 (T, 68, 2): parsing them from JSON cost ~6 ms per clip,
        # more than decoding and augmenting the frames a batch takes from it.
        # (Ragged or non-numeric landmarks stay in the JSON, where readers skip the clip and count why.)
        try:
            array = np.asarray(meta["landmarks"], dtype=np.float32)
        except (TypeError, ValueError):
            array = None
        if array is not None:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            sample[LANDMARKS_MEMBER] = buffer.getvalue()
            meta = {k: v for k, v in meta.items() if k != "landmarks"}
    sample["json"] = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    # Tar members: a 512-byte header each, payload padded to 512 (the tar stream buffers, so count here).
    size = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")
    return sample, frames, size


class ShardWriter:
    """Context manager that rolls samples into shards at ``url`` and commits them with a manifest.

    A new shard starts when the current one holds ``max_samples`` samples or the next sample would take
    its members past ``max_bytes`` (tar's end-of-archive padding adds up to 10 KiB on top). A sample larger
    than ``max_bytes`` gets a shard of its own.

    Concurrent writers to one URL (module docstring): each write has its own shard names and commits with a
    compare-and-swap, so the first to commit wins and a later one raises :class:`ConcurrentWriteError` from
    :meth:`close`. ``keep_replaced=True`` keeps the shards of the version a commit replaces (default: deleted).
    """

    def __init__(
        self,
        url: str,
        kind: str,
        split: str,
        generator: dict[str, Any] | None = None,
        max_samples: int = 1000,
        max_bytes: int = 256 * 2**20,
        jpeg_quality: int = 90,
        tmp_dir: str | None = None,
        keep_replaced: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"ShardWriter kind must be one of {list(KINDS)}, got {kind!r}")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("ShardWriter max_samples and max_bytes must be >= 1")
        self.url = str(url)
        self.kind = kind
        self.split = split
        self.generator = dict(generator or {})
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.jpeg_quality = jpeg_quality
        self.skips = SkipCounter()
        self.shards: list[ShardEntry] = []
        self.manifest: dict[str, Any] | None = None
        self._keys: set[str] = set()
        self._identities: set[str] = set()
        self._closed = True  # until set up: nothing to clean
        self.keep_replaced = keep_replaced
        self.write_id = secrets.token_hex(6)
        self._tar = None
        self._tar_file = None
        self._shard_samples = 0
        self._shard_frames = 0
        self._shard_bytes = 0
        self._published: list[str] = []  # URLs this write created, in order (removed if it does not commit)
        self._indexes: list[str] = []  # the DALI index beside each published .tar shard
        store.check_access(self.url, write=True)
        # The committed version this write will replace (kept, and readable, until this write commits).
        self._base = _committed_version(self.url)
        self._conditional = _conditional_writes(self.url)
        self._tmp = Path(tempfile.mkdtemp(prefix="shards-", dir=tmp_dir))
        # Claim the plain shard names, or use names tagged with this write's id: never another write's names.
        claim = store.join(self.url, PLAIN_CLAIM)
        try:
            claimed = self._conditional and _create_only(b"", claim)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._tag: str | None = None if claimed else self.write_id
        if claimed:
            self._published.append(claim)
        self._closed = False

    # ------------------------------------------------------------ samples

    def write(self, key: str, jpegs: list[bytes] | bytes, meta: dict[str, Any]) -> None:
        """Add one sample: a clip (list of JPEG bytes named by ``meta['frame_indices']``) or one frame."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not key or "." in key or "/" in key:
            raise ValueError(
                f"sample key {key!r} must be non-empty without '.' or '/' (WebDataset splits at dots)"
            )
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}: keys must be unique per dataset")
        sample, frames, size = sample_members(self.kind, key, jpegs, meta)
        if self._tar is not None and (
            self._shard_samples >= self.max_samples or self._shard_bytes + size > self.max_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        self._tar.write(sample)
        self._keys.add(key)
        if meta.get("identity_id") is not None:
            self._identities.add(str(meta["identity_id"]))
        self._shard_samples += 1
        self._shard_frames += frames
        self._shard_bytes += size

    def write_clip(self, sample: ClipLike) -> None:
        """Encode a clip's uint8 frames as JPEG and write it."""
        jpegs = [encode_jpeg(frame, self.jpeg_quality) for frame in sample.frames]
        self.write(sample.key, jpegs, sample.meta)

    def write_frame(self, sample: FrameLike) -> None:
        """Encode one labelled face image as JPEG and write it."""
        self.write(sample.key, encode_jpeg(sample.image, self.jpeg_quality), sample.meta)

    def skip(self, reason: str, detail: str = "") -> None:
        """Count input that was left out (recorded in the manifest's ``skipped``)."""
        self.skips(reason, detail)

    @property
    def samples_written(self) -> int:
        return sum(s.samples for s in self.shards) + self._shard_samples

    # ------------------------------------------------------------ shards

    def _start_shard(self) -> None:
        from webdataset import TarWriter

        path = self._tmp / shard_name(len(self.shards))
        self._tar_file = open(path, "wb")  # noqa: SIM115 - closed in _finish_shard/abort
        # An integer mtime keeps every member a plain ustar header (a float mtime adds a PAX header per
        # member, which doubles the headers a reader has to parse).
        self._tar = TarWriter(self._tar_file, encoder=False, mtime=int(time.time()))
        self._shard_samples = 0
        self._shard_frames = 0
        self._shard_bytes = 0

    def _finish_shard(self) -> None:
        path = self._tmp / shard_name(len(self.shards))
        name = shard_name(len(self.shards), self._tag)
        self._tar.close()
        self._tar_file.close()  # TarWriter leaves a passed-in file open
        self._tar, self._tar_file = None, None
        entry = ShardEntry(
            name=name,
            samples=self._shard_samples,
            frames=self._shard_frames,
            bytes=path.stat().st_size,
            sha256=_sha256(path),
        )
        url = store.join(self.url, name)
        if url not in self._published:
            self._published.append(url)  # before the upload: a failed upload is cleaned up too
        if name.endswith(".tar"):  # DALI's fn.readers.webdataset reads the shard with it, no inferring scan
            index = write_index(path, path.with_suffix(".idx"))
            self._indexes.append(index_url(url))
            store.put_file(index, index_url(url), move=True)
            index.unlink(missing_ok=True)
        store.put_file(path, url, move=True)
        path.unlink(missing_ok=True)
        self.shards.append(entry)
        self._shard_samples = 0
        self._shard_frames = 0

    # ------------------------------------------------------------ commit / abort

    def close(self) -> dict[str, Any]:
        """Publish the last shard, then commit ``manifest.json`` (last: the commit point) if no other writer
        committed this URL since this writer started; else remove this write's shards and raise
        :class:`ConcurrentWriteError`. After the commit, delete the replaced version's shards."""
        if self._closed:
            return self.manifest
        try:
            if self._tar is not None:
                self._finish_shard()
            manifest = build_manifest(
                self.kind,
                self.split,
                self.generator,
                self.shards,
                identities=len(self._identities),
                skipped=self.skips.as_dict(),
                write_id=self.write_id,
            )
            payload = json.dumps(manifest, indent=1).encode("utf-8")
            try:
                _commit(self.url, payload, self._base, self.write_id, self._conditional)
            except ConcurrentWriteError:
                self._remove_published("this write lost to a concurrent one")
                raise
            self.manifest = manifest
            listed = {s.name for s in self.shards}
            unused = [u for u in self._published if store.basename(u) not in listed]  # an unused claim
            _remove_all(unused, "claim of a write without shards")
            if self._base is not None and not self.keep_replaced:
                self._remove_replaced(listed)
        finally:
            self._cleanup()
        return self.manifest

    def _remove_replaced(self, listed: set[str]) -> None:
        """Delete the shards of the version this commit replaced; the plain-name claim last."""
        old = [n for n in self._base.shard_names if n not in listed]
        old.sort(key=lambda n: n == PLAIN_CLAIM)
        indexes = [index_url(store.join(self.url, n)) for n in old if n.endswith(".tar")]
        _remove_all(indexes, "index of a replaced version")
        _remove_all([store.join(self.url, n) for n in old], "replaced by a new version")

    def _remove_published(self, why: str) -> None:
        """Delete this write's shards, newest first, so the plain-name claim (the first) goes last."""
        _remove_all(list(reversed(self._indexes)), why)
        _remove_all(list(reversed(self._published)), why)
        self._published, self._indexes = [], []

    def abort(self) -> None:
        """Drop the shard in progress and the shards this write published; commit nothing (the version already
        committed at the URL, if any, stays)."""
        if self._closed:
            return
        if self._tar is not None:
            try:
                self._tar.close()
                self._tar_file.close()
            except Exception:  # noqa: BLE001 - aborting anyway
                pass
            self._tar, self._tar_file = None, None
        self._remove_published("the write was aborted")
        self._cleanup()

    def _cleanup(self) -> None:
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and os.path.isdir(getattr(self, "_tmp", "")):
            shutil.rmtree(self._tmp, ignore_errors=True)
