"""Write samples into WebDataset tar shards plus a ``manifest.json`` written last (the commit point).

Each shard is built in a local temporary file, then published whole (atomic rename for local folders,
upload for ``s3://``), so readers never see a half-written shard. If the writer fails, no manifest is
written and the dataset stays uncommitted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_shards import store
from data_shards.manifest import KINDS, MANIFEST_NAME, ShardEntry, build_manifest, shard_name
from data_shards.read import EXACT_LANDMARKS_MEMBER, LANDMARKS_MEMBER, SkipCounter


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Context manager that rolls samples into shards at ``url`` and commits them with a manifest.

    A new shard starts when the current one holds ``max_samples`` samples or the next sample would take
    its members past ``max_bytes`` (tar's end-of-archive padding adds up to 10 KiB on top). A sample larger
    than ``max_bytes`` gets a shard of its own.
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
        self._closed = False
        store.check_access(self.url, write=True)
        # An older manifest would describe shards this run overwrites: uncommit it first.
        store.remove(store.join(self.url, MANIFEST_NAME))
        self._tmp = Path(tempfile.mkdtemp(prefix="shards-", dir=tmp_dir))
        self._tar = None
        self._tar_file = None
        self._shard_samples = 0
        self._shard_frames = 0
        self._shard_bytes = 0

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
        sample: dict[str, Any] = {"__key__": key}
        if self.kind == "clips":
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
        if self.kind == "clips" and meta.get("landmarks_exact") is not None:
            # Evaluation-only exact landmarks (SynthFace) as their own member: training never parses them.
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(meta["landmarks_exact"], dtype=np.float32), allow_pickle=False)
            sample[EXACT_LANDMARKS_MEMBER] = buffer.getvalue()
            meta = {k: v for k, v in meta.items() if k != "landmarks_exact"}
        if self.kind == "clips" and meta.get("landmarks") is not None:
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
        name = shard_name(len(self.shards))
        path = self._tmp / name
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
        store.put_file(path, store.join(self.url, name), move=True)
        path.unlink(missing_ok=True)
        self.shards.append(entry)
        self._shard_samples = 0
        self._shard_frames = 0

    # ------------------------------------------------------------ commit / abort

    def close(self) -> dict[str, Any]:
        """Publish the last shard, then write ``manifest.json`` (last: the commit point)."""
        if self._closed:
            return self.manifest
        try:
            if self._tar is not None:
                self._finish_shard()
            self.manifest = build_manifest(
                self.kind,
                self.split,
                self.generator,
                self.shards,
                identities=len(self._identities),
                skipped=self.skips.as_dict(),
            )
            payload = json.dumps(self.manifest, indent=1).encode("utf-8")
            store.put_bytes(payload, store.join(self.url, MANIFEST_NAME))
        finally:
            self._cleanup()
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress; write no manifest (published shards stay, uncommitted)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._tar_file.close()
            except Exception:  # noqa: BLE001 - aborting anyway
                pass
            self._tar, self._tar_file = None, None
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
