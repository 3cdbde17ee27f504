"""What every pipeline does with a clip before the pixels: check it, choose its frames, group clips into batches.

* :func:`resilient_reader` reads a shard so that a store lost mid-shard is retried with the backoff of
  ``data_shards.store.StoreConfig`` (re-opening the shard and continuing after the last sample read), then
  raises :class:`data_shards.store.StoreError` naming ``AWS_ENDPOINT_URL_S3``. Credentials and missing files
  are not retried: they fail at once, clearly.
* :func:`validate_landmarks` and :func:`choose_frames`: a clip without (frames, 68, 2) finite landmarks is
  skipped (``missing_landmarks`` / ``bad_landmarks``), as is one the sampler's short-clip policy drops.
* :class:`ClipGroup`: one batch's clips and frame positions, in row-block order; :class:`HostBatch`: what the
  background threads of the batched pipelines hand to the thread that finishes a batch.
* :func:`device_seed`: the seed of a batch's FaceSwap/augmentation draws, a function of its position only.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_shards import store
from pretrain.sampling import FrameSampler

log = logging.getLogger(__name__)
DEFAULT_FPS = 25.0 / 6.0  # clips without an fps in their metadata


def resilient_reader(read, handler, sleep=time.sleep):
    """``read(url, handler)`` wrapped so a store lost mid-shard is retried with backoff, then a clear error.

    A retry re-opens the shard and skips the samples already yielded (shards are read in a fixed order), so the
    stream sees each sample once. Translated user errors (:class:`StoreError`) and missing files are not retried.
    ``read_shard(url, sha256=...)`` passes the manifest's sha256 on to ``read`` (when ``read`` takes it): a retry
    hashes the re-read shard from its first byte, and a mismatch (:class:`data_shards.read.ShardIntegrityError`,
    not an ``OSError``) is not retried but passed to the stream, which treats the shard as unreadable.
    """
    from data_shards.read import accepts_sha256

    checks = accepts_sha256(read)

    def read_shard(url: str, sha256: str | None = None):
        kwargs = {"sha256": sha256} if sha256 and checks else {}
        done = attempt = 0
        while True:
            try:
                for i, sample in enumerate(read(url, handler, **kwargs)):
                    if i < done:
                        continue
                    done += 1
                    attempt = 0
                    yield sample
                return
            except (store.StoreError, FileNotFoundError, PermissionError):
                raise
            except Exception as err:
                if not (store._is_transient(err) or isinstance(err, OSError)):
                    raise
                cfg = store.get_config()
                if attempt >= cfg.retries:
                    raise store.StoreError(
                        f"lost the object store while reading {url} ({type(err).__name__}: {err}) after "
                        f"{attempt + 1} attempts: check that the store at AWS_ENDPOINT_URL_S3="
                        f"{store.endpoint() or '(unset: AWS default)'} is up and reachable from this host"
                    ) from err
                log.warning("store error reading %s (%s); retry %d/%d", url, err, attempt + 1, cfg.retries)
                sleep(store.backoff_delay(attempt, cfg))  # full jitter: ranks do not retry in lockstep
                attempt += 1

    return read_shard


FPS_RANGE = (0.1, 1000.0)  # frames per second a clip may declare
SIZE_RANGE = (8, 16384)  # pixels: the frame side the landmarks refer to


def clip_fps(meta: dict[str, Any]) -> float | None:
    """The clip's frame rate (DEFAULT_FPS when absent), or None when the JSON value is not a sane number
    (Infinity, NaN, 1e400, a string, a list)."""
    raw = meta.get("fps")
    if raw is None:
        return DEFAULT_FPS
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    fps = float(raw)
    return fps if math.isfinite(fps) and FPS_RANGE[0] <= fps <= FPS_RANGE[1] else None


def size_ok(meta: dict[str, Any]) -> bool:
    """``meta['size']`` (the side the landmarks refer to) absent, or an integer in SIZE_RANGE."""
    raw = meta.get("size")
    if raw is None:
        return True
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        return False
    return float(raw).is_integer() and SIZE_RANGE[0] <= raw <= SIZE_RANGE[1]


def validate_landmarks(meta: dict[str, Any], frames: int) -> str | None:
    """None if the clip's geometry can be trusted, else the skip reason: ``meta['landmarks']`` must be
    (frames, 68, 2) finite numbers, ``meta['fps']`` a sane frame rate, ``meta['size']`` a sane frame side."""
    if clip_fps(meta) is None:
        return "bad_fps"
    if not size_ok(meta):
        return "bad_size"
    raw = meta.get("landmarks")
    if raw is None:
        return "missing_landmarks"
    try:  # an array already when the shard stores landmarks.npy (cheap); lists from older JSON shards
        lm = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError):
        return "bad_landmarks"
    if lm.shape != (frames, 68, 2) or not np.isfinite(lm).all():
        return "bad_landmarks"
    return None


def choose_frames(
    sample: dict[str, Any], sampler: FrameSampler, layout: str, rng, skips
) -> tuple[int, ...] | None:
    """Frame positions of one clip in row-block order (``[A, NA, P, NP]`` or ``[A, P]``), or None to skip it.

    A clip with unusable landmarks is counted with ``skips``; the sampler counts its own short-clip reasons.
    """
    frames, meta = sample["frames"], sample["meta"]
    reason = validate_landmarks(meta, len(frames))
    if reason is not None:
        skips(
            reason,
            f"clip {str(sample.get('key'))[:200]}: landmarks must be ({len(frames)}, 68, 2) finite numbers, "
            f"fps a number in {FPS_RANGE}, size an integer in {SIZE_RANGE}",
        )
        return None
    choice = sampler.sample_clip(len(frames), clip_fps(meta), rng)
    if choice is None:
        return None
    if layout == "sslfer":
        return (choice.anchor, choice.hard_anchor, choice.positive, choice.hard_positive)
    return (choice.anchor, choice.positive)


def identity_code(identity_id: str) -> int:
    """Stable integer for an identity string (same on every rank and run)."""
    return zlib.crc32(str(identity_id).encode()) & 0x7FFFFFFF


def clip_identity(sample: dict[str, Any]) -> int:
    """:func:`identity_code` of a clip sample (its key when the metadata names no identity)."""
    return identity_code(sample["meta"].get("identity_id", sample["key"]))


def device_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    # Salted so the device stream differs from the frame-choice stream of the same batch.
    return int(
        np.random.SeedSequence([seed, epoch, rank, index, 0x5EED]).generate_state(1, np.uint64)[0] >> 1
    )


def replacement_row(bad: int, good: list[int], clips: int) -> int:
    """The row that stands in for undecodable row ``bad``: the first good row of the same clip, else any.

    Rows are clip-major within each block, so row ``i`` belongs to clip ``i % clips``.
    """
    same_clip = [j for j in good if j % clips == bad % clips]
    return (same_clip or good)[0]


@dataclass
class ClipGroup:
    """One batch's clips, as the reader hands them to the threads that build the batch."""

    epoch: int
    index: int  # batch number within the epoch
    samples: list[dict[str, Any]]
    choices: list[tuple[int, ...]]  # frame positions per clip, in row-block order
    swap_p: float = 0.0  # FaceSwap probability for this batch (faceswap.p, ramped by faceswap.p_warmup_steps)

    def rows(self) -> list[tuple[dict[str, Any], int]]:
        """(clip sample, frame position) of every image row, block by block, clips in order within a block."""
        blocks = len(self.choices[0]) if self.choices else 0
        return [
            (sample, choice[block])
            for block in range(blocks)
            for sample, choice in zip(self.samples, self.choices)
        ]


def frame_landmarks(sample: dict[str, Any], position: int, image_size: int) -> np.ndarray:
    """Landmarks (68, 2) of one frame, in pixels of the ``image_size`` frames the decoders produce."""
    meta = sample["meta"]
    scale = image_size / float(meta.get("size") or image_size)
    return np.asarray(meta["landmarks"][position], dtype=np.float32) * scale


@dataclass
class HostBatch:
    """What the background threads hand over: raw bytes or decoded uint8 images, plus metadata."""

    epoch: int
    index: int
    keys: list[str]
    layout: str  # "sslfer" ([A, NA, P, NP]) or "simclr" ([A, P])
    landmarks: torch.Tensor  # (N, 68, 2) float32 in image_size pixels
    identity: torch.Tensor  # (B,) long
    jpegs: list[bytes] | None = None  # decoded later, where the batch is finished
    images: torch.Tensor | None = None  # decoded in the background: uint8 (N, 3, S, S)
    bad_rows: list[int] = field(default_factory=list)
    swap_p: float = 0.0  # FaceSwap probability for this batch


def as_clip(sample: dict[str, Any]) -> dict[str, Any]:
    """A ``frames`` sample (``{key, jpeg, meta}``: one image) as a one-frame clip; a clip sample unchanged.

    The pipelines only know clips, so an image dataset is pretrained on as clips of one frame (SimCLR views of the
    image, FaceSwap, MaskFN; TimeAug and HardNeg need real clips, see :func:`pretrain.preflight.check`):

    * ``frames = [jpeg]``, ``frame_indices = [0]``, ``meta["landmarks"]`` (68, 2) -> (1, 68, 2);
    * without ``meta["size"]`` (evaluation sets resized to a square do not record it) the side the landmarks
      refer to is read from the JPEG header (:func:`data_shards.jpeg_header.jpeg_size`, nothing is decoded). A
      non-square image is stretched to a square by the decoders, so its x and y are scaled onto a square of its
      longer side. An unreadable header leaves the size absent: the decoders count the JPEG as ``corrupt_jpeg``;
    * without an ``identity_id`` the image is its own identity (its key), so FaceSwap still finds donors.

    Landmarks that are not (68, 2) numbers are passed on unchanged, for :func:`validate_landmarks` to count.
    """
    if "frames" in sample or "jpeg" not in sample:
        return sample
    from data_shards.jpeg_header import BadJpeg, jpeg_size

    jpeg = sample["jpeg"]
    meta = dict(sample["meta"])
    landmarks = meta.get("landmarks")
    if landmarks is not None:
        try:
            array = np.asarray(landmarks, dtype=np.float32)
        except (TypeError, ValueError):
            array = None
        if array is not None and array.shape == (68, 2):
            landmarks = array[None]
    if meta.get("size") is None:
        try:
            width, height = jpeg_size(jpeg)
        except BadJpeg:
            width = height = 0
        if width > 0 and height > 0:
            side = max(width, height)
            if width != height and isinstance(landmarks, np.ndarray) and landmarks.shape == (1, 68, 2):
                landmarks = landmarks * np.array([side / width, side / height], dtype=np.float32)
            meta["size"] = side
    if landmarks is not None:
        meta["landmarks"] = landmarks
    if meta.get("identity_id") in (None, ""):
        meta["identity_id"] = str(sample.get("key"))
    clip = {k: v for k, v in sample.items() if k != "jpeg"}
    clip.update(frames=[jpeg], meta=meta, frame_indices=[0])
    return clip
