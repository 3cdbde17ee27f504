"""Read shard datasets: the manifest, shard URLs and samples, skipping (and counting) bad input.

A corrupt sample never stops a reader: bad JSON or a missing part skips that sample, a truncated or
corrupt tar ends that shard after its last complete sample. Every skip is counted by reason, and logged at
most a few times per reason so a bad dataset cannot flood the log.

Reading is bounded and total: any failure while parsing one sample (whatever the exception) skips that sample,
any failure while parsing the archive ends that shard; only storage errors (``OSError``: credentials, network,
a missing shard) are raised, since they have their own retry path. Bounds: a member is at most
``tar_stream.MAX_MEMBER_BYTES`` (checked before reading), a sample at most :data:`MAX_SAMPLE_BYTES` and
:data:`MAX_SAMPLE_MEMBERS` members, a JSON at most :data:`MAX_JSON_BYTES`, a landmarks array is checked from its
.npy header before it is loaded, and frame numbers have at most 9 digits. A reader thus never holds more than
about one sample's bytes (<= 1 GiB) however hostile the shard (plus, when checking a shard's sha256, the shard
itself if it is at most :data:`VERIFY_BUFFER_BYTES`: see below).

**sha256.** Given the manifest's ``sha256`` of a shard, :func:`iter_samples` checks it in the same pass (the
bytes read once from storage are hashed; no second read). A shard of at most :data:`VERIFY_BUFFER_BYTES` is read
whole into memory first and hashed in one call, so a mismatch is known before any of its samples is yielded and
none is used; a larger shard is streamed, hashed below the tar parser (one ``update`` per 1 MiB buffer fill), and
its samples are yielded as they are parsed, so when the end of the shard shows a mismatch they have already been
handed out (streaming cannot know earlier without holding the whole shard). Either way the mismatch is counted
(``sha256_mismatch``), logged with the shard and the fix, and :class:`ShardIntegrityError` is raised at the end
of the shard so the caller (the training stream) can treat the shard as unreadable from then on. A small
mismatching shard is still parsed (its samples dropped) so that the faults inside it are counted by their own
reasons too (``truncated_tar``, ``bad_json``, ...). Without a ``sha256`` nothing is hashed.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from data_shards import store
from data_shards.manifest import MANIFEST_NAME, ManifestError, validate_manifest
from data_shards.tar_stream import TarFormatError, TruncatedMember, iter_members

log = logging.getLogger(__name__)

FRAME_NAME = re.compile(r"^(\d{1,9})\.jpe?g$", re.IGNORECASE)
KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext
META_MEMBER = re.compile(r"(^|/)__[^/]*__($|/)")  # names WebDataset skips as metadata
MAX_SAMPLE_BYTES = 1 << 30
MAX_SAMPLE_MEMBERS = 100_000
MAX_JSON_BYTES = 16 << 20
# Clip shards keep per-frame landmarks in this member (float32 array (T, 68, 2) in .npy format) rather than in
# the JSON; shards written before carry them as ``meta["landmarks"]`` lists, which readers still accept.
LANDMARKS_MEMBER = "landmarks.npy"
# SynthFace's exact landmarks (evaluation labels; training reads the detector-like ones above and never these).
EXACT_LANDMARKS_MEMBER = "landmarks_exact.npy"
# Shards up to this size are read whole and their sha256 checked before any sample is yielded (larger: streamed).
VERIFY_BUFFER_BYTES = 64 << 20
HASH_BUFFER_BYTES = 1 << 20  # bytes hashed per update while streaming
SkipHandler = Callable[[str, str], None]


class ShardIntegrityError(ValueError):
    """A shard's bytes do not hash to the sha256 its manifest lists: it is not the shard the manifest describes
    (overwritten by another writer, or corrupted). Raised at the end of the shard, after counting it.

    Not an ``OSError``: a retry would read the same bytes, so store-retry wrappers pass it through."""

    def __init__(self, url: str, expected: str, actual: str, samples_yielded: int) -> None:
        super().__init__(f"{url}: sha256 {actual} does not match the manifest's {expected}")
        self.url, self.expected, self.actual = url, expected, actual
        self.samples_yielded = samples_yielded


class SkipCounter:
    """Counts skipped input by reason; logs the first ``log_first`` of each reason, then every ``log_every``."""

    def __init__(
        self, log_first: int = 3, log_every: int = 1000, logger: logging.Logger | None = None
    ) -> None:
        self.counts: Counter[str] = Counter()
        self.log_first = log_first
        self.log_every = log_every
        self._log = logger or log
        self._lock = threading.Lock()

    def __call__(self, reason: str, detail: str = "") -> None:
        with self._lock:
            self.counts[reason] += 1
            n = self.counts[reason]
        if n <= self.log_first or n % self.log_every == 0:
            self._log.warning("skipped (%s, %d so far): %s", reason, n, detail)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


# Process-wide default, so callers that pass no handler still get counts (e.g. to export as a metric).
SKIPPED = SkipCounter()


def read_manifest(url: str) -> dict[str, Any]:
    """The dataset's manifest; clear errors if it is missing or malformed."""
    manifest_url = store.join(url, MANIFEST_NAME)
    try:
        raw = store.read_bytes(manifest_url)
    except FileNotFoundError as err:
        raise ManifestError(
            f"no manifest.json at {url}: the dataset is incomplete or the path is wrong "
            "(a dataset is committed only when its writer finishes)"
        ) from err
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"manifest.json at {url} is not valid JSON: {err}") from err
    return validate_manifest(manifest, url)


def shard_urls(url: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Full URLs of the dataset's shards, in manifest order."""
    manifest = manifest or read_manifest(url)
    return [store.join(url, shard["name"]) for shard in manifest["shards"]]


def _sample_from_parts(key: str, parts: dict[str, bytes], handler: SkipHandler, where: str) -> dict | None:
    try:
        return _parse_sample(key, parts, handler, where)
    except Exception as err:  # total: no input may stop a reader; the reason names what failed
        handler("bad_sample", f"{where} sample {key[:200]}: {type(err).__name__}: {str(err)[:200]}")
        return None


def _parse_sample(key: str, parts: dict[str, bytes], handler: SkipHandler, where: str) -> dict | None:
    if "json" not in parts:
        handler("missing_json", f"{where} sample {key}")
        return None
    try:
        if len(parts["json"]) > MAX_JSON_BYTES:
            raise ValueError(f"{len(parts['json'])} bytes, over the {MAX_JSON_BYTES} cap")
        meta = json.loads(parts["json"])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        handler("bad_json", f"{where} sample {key}: {err}")
        return None
    if LANDMARKS_MEMBER in parts:
        try:
            meta["landmarks"] = _load_npy(parts[LANDMARKS_MEMBER])
        except ValueError as err:
            handler("bad_landmarks", f"{where} sample {key}: {LANDMARKS_MEMBER}: {err}")
            return None
    if "jpg" in parts:
        return {"key": key, "jpeg": parts["jpg"], "meta": meta}
    numbered = []
    for name, data in parts.items():
        match = FRAME_NAME.match(name)
        if match:
            numbered.append((int(match.group(1)), data))
    if not numbered:
        handler("missing_jpeg", f"{where} sample {key}")
        return None
    numbered.sort(key=lambda item: item[0])  # numeric: "10000.jpg" after "9999.jpg"
    return {
        "key": key,
        "frames": [data for _, data in numbered],
        "meta": meta,
        "frame_indices": [i for i, _ in numbered],
    }


def _load_npy(data: bytes) -> np.ndarray:
    """A numeric array from .npy bytes (never pickles); ValueError if the bytes are not one.

    The header is checked before loading: its shape must account for exactly the bytes present, so a header
    claiming 10^12 frames is refused instead of allocated."""
    fmt = np.lib.format
    try:
        stream = io.BytesIO(data)
        version = fmt.read_magic(stream)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject or dtype.kind not in "fiu":
            raise ValueError(f"dtype {dtype} is not numeric")
        needed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if needed != len(data) - stream.tell():
            raise ValueError(
                f"header shape {shape} needs {needed} bytes, {len(data) - stream.tell()} present"
            )
        # from the header just checked (np.load would parse it again: a quarter of the sample parse time)
        flat = np.frombuffer(data, dtype=dtype, offset=stream.tell())
        array = flat.reshape(shape, order="F" if fortran_order else "C").copy()  # writable, own memory
    except (OSError, EOFError, ValueError, TypeError, OverflowError) as err:
        raise ValueError(f"not a readable .npy array ({str(err)[:200]})") from err
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise ValueError("not a numeric array")
    return array


def member_key(name: str) -> tuple[str | None, str]:
    """(sample key, extension) by WebDataset's rule: the key is the path up to the first dot of the file name
    (dots in folder names stay in the key), the extension the rest, lower-cased. ``./`` prefixes (``tar -C dir
    -cf x.tar .``) are dropped from the key. (None, "") for a name without an extension."""
    match = KEY_AND_EXTENSION.match(name)
    if not match:
        return None, ""
    key = match.group(1)
    while key.startswith("./"):
        key = key[2:]
    return key, match.group(2).lower()


def iter_tar_samples(stream, where: str, handler: SkipHandler) -> Iterator[dict[str, Any]]:
    """Samples from an open tar stream, members grouped consecutively by :func:`member_key`."""
    current_key: str | None = None
    parts: dict[str, bytes] = {}
    held = 0  # bytes of the sample being assembled
    duplicate = False
    try:
        for name, data in iter_members(stream):
            key, ext = member_key(name)
            if key is None:
                if not META_MEMBER.search(name):
                    handler("member_without_extension", f"{where} member {name[:200]}")
                continue
            if key != current_key:
                if current_key is not None:
                    sample = _finish(current_key, parts, duplicate, handler, where)
                    if sample is not None:
                        yield sample
                current_key, parts, held, duplicate = key, {}, 0, False
            if ext in parts:  # WebDataset refuses a sample with two members of one name; so do we, counted
                duplicate = True
            held += len(data)
            if held > MAX_SAMPLE_BYTES or len(parts) >= MAX_SAMPLE_MEMBERS:
                raise TarFormatError(
                    f"sample {key[:200]} holds over {MAX_SAMPLE_BYTES} bytes or {MAX_SAMPLE_MEMBERS} members"
                )
            parts[ext] = data
    except OSError as err:
        if not isinstance(err, gzip.BadGzipFile):
            raise  # storage problems (network, credentials) are not corrupt data: the caller retries
        handler("truncated_tar", f"{where}: {type(err).__name__}: {err}")
        return
    except Exception as err:  # noqa: BLE001 - any parse failure of the archive ends this shard, counted
        # Network errors (OSError) are not caught here: they are storage problems, not corrupt data.
        # The sample being read when the tar broke may be incomplete: drop it, keep what came before. If the
        # cut member already belongs to the next sample, the one before it is complete.
        if isinstance(err, TruncatedMember) and current_key is not None:
            if member_key(err.name)[0] != current_key:
                sample = _finish(current_key, parts, duplicate, handler, where)
                if sample is not None:
                    yield sample
        handler("truncated_tar", f"{where}: {type(err).__name__}: {err}")
        return
    if current_key is not None:
        sample = _finish(current_key, parts, duplicate, handler, where)
        if sample is not None:
            yield sample


def _finish(
    key: str, parts: dict[str, bytes], duplicate: bool, handler: SkipHandler, where: str
) -> dict | None:
    if duplicate:
        handler("duplicate_member", f"{where} sample {key[:200]}: two members with the same name")
        return None
    return _sample_from_parts(key, parts, handler, where)


class _HashingRaw(io.RawIOBase):
    """Raw reader over ``raw`` that hashes (sha256) and counts every byte read through it."""

    def __init__(self, raw, already: bytes = b"") -> None:
        super().__init__()
        self.raw = raw
        self.digest = hashlib.sha256(already)
        self.size = len(already)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if hasattr(self.raw, "readinto"):
            n = self.raw.readinto(buffer) or 0
        else:
            data = self.raw.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.size += n
        return n


class HashedStream:
    """A buffered binary reader over ``raw`` that computes the sha256 of every byte it reads from ``raw``.

    Hashing sits below the buffer, so the tar parser's many small reads cost no extra hashing calls: the digest
    is updated once per buffer fill (or once per large read). :meth:`drain` reads the rest, e.g. tar padding
    after the end-of-archive blocks, so :meth:`hexdigest` covers the whole file. ``already``: bytes of the same
    file read from ``raw`` before (the digest starts with them).
    """

    def __init__(self, raw, buffer_size: int = HASH_BUFFER_BYTES, already: bytes = b"") -> None:
        self._raw = _HashingRaw(raw, already)
        self._buffered = io.BufferedReader(self._raw, buffer_size)
        self.read = self._buffered.read

    def drain(self) -> None:
        while self._buffered.read(4 * HASH_BUFFER_BYTES):
            pass

    @property
    def size(self) -> int:
        """Bytes read from ``raw`` so far."""
        return self._raw.size

    def hexdigest(self) -> str:
        """sha256 of the bytes read from ``raw`` so far."""
        return self._raw.digest.hexdigest()


class _Chain:
    """Reads ``first`` to its end, then ``second``."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def read(self, size: int = -1) -> bytes:
        if self.first is None:
            return self.second.read(size)
        data = self.first.read(size)
        if size < 0 or len(data) < size:
            self.first = None  # drop the buffered head as soon as it is used up
            rest = self.second.read(size if size < 0 else size - len(data))
            data = data + rest if data else rest
        return data


def accepts_sha256(read: Callable[..., Any]) -> bool:
    """Whether the shard reader ``read`` takes a ``sha256=`` keyword (as :func:`iter_samples` does)."""
    try:
        params = inspect.signature(read).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "sha256" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _dataset_of(shard_url: str) -> str:
    return shard_url.rstrip("/").rsplit("/", 1)[0] if "/" in shard_url else "."


def _mismatch(shard_url: str, expected: str, actual: str, yielded: int, handler: SkipHandler) -> None:
    used = (
        f"the {yielded} samples streamed from it before the check were already used"
        if yielded
        else "none of its samples was used"
    )
    handler(
        "sha256_mismatch",
        f"{shard_url}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}...: this shard is "
        f"not the one the manifest describes (overwritten by another writer, or corrupted); {used}, and it is "
        f"treated as unreadable. Fix: re-write the dataset, or find every bad shard with "
        f"`python -m data_shards verify {_dataset_of(shard_url)}`",
    )
    raise ShardIntegrityError(shard_url, expected, actual, yielded)


def _iter_verified(stream, shard_url: str, handler: SkipHandler, sha256: str) -> Iterator[dict[str, Any]]:
    chunks, held = [], 0
    while held <= VERIFY_BUFFER_BYTES:  # in 1 MiB reads: no up-front VERIFY_BUFFER_BYTES allocation per shard
        chunk = stream.read(HASH_BUFFER_BYTES)
        if not chunk:
            break
        chunks.append(chunk)
        held += len(chunk)
    head = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    del chunks
    if len(head) <= VERIFY_BUFFER_BYTES:  # the whole shard: check it before yielding anything
        actual = hashlib.sha256(head).hexdigest()
        if actual != sha256:
            # Parsed all the same, only so that what is wrong inside it is counted too (truncated_tar, bad_json...):
            # none of its samples is yielded.
            for _ in iter_tar_samples(io.BytesIO(head), shard_url, handler):
                pass
            _mismatch(shard_url, sha256, actual, 0, handler)
        yield from iter_tar_samples(io.BytesIO(head), shard_url, handler)
        return
    hashed = HashedStream(stream, already=head)
    source = _Chain(io.BytesIO(head), hashed)
    del head
    yielded = 0
    for sample in iter_tar_samples(source, shard_url, handler):
        yielded += 1
        yield sample
    hashed.drain()  # the tar's end padding, or whatever follows a truncated archive
    actual = hashed.hexdigest()
    if actual != sha256:
        _mismatch(shard_url, sha256, actual, yielded, handler)


def iter_samples(
    shard_url: str, handler: SkipHandler | None = None, sha256: str | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one shard: ``dict(key, frames=[jpeg...], meta)`` (clips) or ``dict(key, jpeg, meta)``.

    ``handler(reason, detail)`` is told about each skip (default: the process-wide :data:`SKIPPED`).
    Storage errors (credentials, unreachable store, missing shard) are raised, not skipped.
    ``sha256`` (the manifest's, for this shard): check the shard's bytes against it while reading; a mismatch is
    counted (``sha256_mismatch``) and raises :class:`ShardIntegrityError` at the end of the shard (see the
    module docstring for which samples are yielded first).
    """
    handler = handler or SKIPPED
    with store.open_url(shard_url, "rb") as stream:
        if sha256:
            yield from _iter_verified(stream, shard_url, handler, sha256)
        else:
            yield from iter_tar_samples(stream, shard_url, handler)


def iter_dataset(url: str, handler: SkipHandler | None = None) -> Iterator[dict[str, Any]]:
    """Every sample of a dataset, shard by shard in manifest order."""
    for shard_url in shard_urls(url):
        yield from iter_samples(shard_url, handler)


join = store.join
