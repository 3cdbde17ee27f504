"""Training batches: clip stream -> frame choice -> decoded images -> FaceSwap -> two augmentation families.

One :class:`BatchPipeline` per rank. Work is split where it runs best:

* a reader thread pulls this rank's clips from :class:`pretrain.stream.ClipStream`, draws each clip's frames
  with :class:`pretrain.sampling.FrameSampler` (dropping clips the short-clip policy skips, so every batch has
  exactly ``data.batch_clips`` clips) and groups them into batches;
* ``data.num_workers`` threads turn a batch into host data: the JPEG bytes in row order, or - on the CPU
  decode path - already decoded uint8 images (libjpeg releases the GIL, so threads decode in parallel);
* the training thread finishes it on the device: nvjpeg decode (device path), FaceSwap on the positives,
  augmentation family "first" on anchors and "second" on positives, mouth-eye descriptors for MaskFN. When the
  device is the CPU, the worker threads finish their batch themselves (``finish_in_workers``): the work is CPU
  work either way, and done there it overlaps the training step and spreads over the workers.

Rows are ``[A, NA, P, NP]`` (``sampling.hard_negatives``) or ``[A, P]``; ``positive_index`` and ``group_id``
come from :func:`pretrain.loss.batch_layout`, in local rows.

Determinism: every random draw of batch ``i`` of epoch ``e`` on rank ``r`` comes from generators seeded by
``(seed, e, r, i)`` - frame choice from :func:`pretrain.sampling.make_rng` (its ``worker`` slot is the batch
index), FaceSwap/augmentation from a device generator - so a batch does not depend on thread timing, and
resuming at batch ``i`` reproduces the uninterrupted run. :meth:`BatchPipeline.state_dict` is the position after
the last batch the trainer *consumed* (prefetched batches are simply prepared again after a resume).

Equal step counts: every rank yields exactly ``steps_in_epoch(e)`` batches in epoch ``e`` (the stream gives equal clip
counts per rank; if skipped clips leave a rank short, it tops up from the start of its epoch list, counted as
``epoch_refill``), so collectives never wait on a rank that ran dry.

**Three implementations, one interface** (``data.pipeline``, built by :func:`make_batch_pipeline`): ``torch``
(this class: torchvision/nvjpeg decode + batched torch augmentation), ``dali`` (:class:`DaliBatchPipeline`: DALI
decode and augmentation stages around the batched torch FaceSwap, see ``pretrain/dali_pipeline.py``) and
``torchvision`` (``pretrain/tv_pipeline.py``: per-sample PIL + torchvision transforms in a torch DataLoader, the
benchmark baseline and a fallback). All three read the same :class:`pretrain.stream.ClipStream`, draw frames with
the same sampler and per-batch seeds, and yield the same :class:`Batch` layout; the engine only sees
``__iter__``, ``state_dict``/``load_state_dict``, ``steps_in_epoch``/``total_steps``, ``skipped_counts`` and
``close``. Resume is exact for all three: every random draw is seeded per batch (the DALI path feeds DALI the
parameters torch drew, so for the same batch it uses the same crops, flips, masks and colour factors as ``torch``).

**Faults** never stop training; each is counted by reason (cumulative, saved in the checkpoint, exported by the
engine through :meth:`BatchPipeline.skipped_counts`) and logged at most a few times per reason:
``truncated_tar`` (corrupt/truncated tar: the shard ends after its last good sample), ``unreadable_shard`` (no
sample at all: the lane reads another of its shards instead), ``short_shard_repeats``, ``bad_json``,
``missing_json``, ``missing_jpeg``, ``corrupt_jpeg`` (the row takes another frame of the same clip),
``missing_landmarks`` / ``bad_landmarks`` (no landmarks, or not (frames, 68, 2) finite numbers: the clip is
skipped), and the sampler's short-clip reasons (``single_frame``, ``hard_negative_short``, ...; a clip is skipped
with ``sampling.short_clip_policy=skip``). Storage problems are not skipped: :func:`data_shards.store.check_access`
runs on ``data.url`` when the pipeline is built (wrong or missing credentials fail before training starts), and a
store lost mid-run is retried with the backoff of ``data_shards.store.StoreConfig`` (re-opening the shard and
continuing after the last sample read), then raises :class:`data_shards.store.StoreError` naming
``AWS_ENDPOINT_URL_S3``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_shards import store
from data_shards.read import SkipCounter, iter_samples
from pretrain.augment import ViewAugmenter, ViewParams, ellipse_masks
from pretrain.decode import decode_jpegs_skipping
from pretrain.faceswap import FaceSwap
from pretrain.loss import batch_layout
from pretrain.sampling import FrameSampler, make_rng

STATE_VERSION = 1
PIPELINES = ("torch", "dali", "torchvision")
log = logging.getLogger(__name__)


def make_batch_pipeline(cfg, rank: int, world_size: int, device: torch.device | str = "cpu") -> BatchPipeline:
    """The batch pipeline ``cfg.data.pipeline`` names (torch | dali | torchvision), same interface for all."""
    kind = getattr(cfg.data, "pipeline", "torch")
    if kind == "torch":
        return BatchPipeline(cfg, rank, world_size, device)
    if kind == "dali":
        return DaliBatchPipeline(cfg, rank, world_size, device)
    if kind == "torchvision":
        from pretrain.tv_pipeline import TorchvisionBatchPipeline

        return TorchvisionBatchPipeline(cfg, rank, world_size, device)
    raise ValueError(f"config key 'data.pipeline': one of {', '.join(PIPELINES)}, got {kind!r}")


def check_dataset_access(url: str) -> None:
    """Fail before training with a clear StoreError when ``url`` cannot be read (credentials, endpoint, path)."""
    first = url
    if "{" in url:
        import braceexpand

        first = next(iter(braceexpand.braceexpand(url)))
    store.check_access(first)


def resilient_reader(read, handler, sleep=time.sleep):
    """``read(url, handler)`` wrapped so a store lost mid-shard is retried with backoff, then a clear error.

    A retry re-opens the shard and skips the samples already yielded (shards are read in a fixed order), so the
    stream sees each sample once. Translated user errors (:class:`StoreError`) and missing files are not retried.
    """

    def read_shard(url: str):
        done = attempt = 0
        while True:
            try:
                for i, sample in enumerate(read(url, handler)):
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
                sleep(min(cfg.backoff_s * 2**attempt, cfg.backoff_max_s))
                attempt += 1

    return read_shard


def validate_landmarks(meta: dict[str, Any], frames: int) -> str | None:
    """None if ``meta['landmarks']`` is (frames, 68, 2) finite numbers, else the skip reason."""
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


def identity_code(identity_id: str) -> int:
    """Stable integer for an identity string (same on every rank and run)."""
    return zlib.crc32(str(identity_id).encode()) & 0x7FFFFFFF


def device_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    # Salted so the device stream differs from the frame-choice stream of the same batch.
    return int(
        np.random.SeedSequence([seed, epoch, rank, index, 0x5EED]).generate_state(1, np.uint64)[0] >> 1
    )


@dataclass
class Batch:
    """One rank's training input, on the device."""

    images: torch.Tensor  # (N, 3, crop, crop) float, normalised views
    positive_index: torch.Tensor  # (N,) long, local rows
    group_id: torch.Tensor  # (N,) long, clip number within this rank's batch (same clip = same identity)
    identity: torch.Tensor  # (N,) long, identity_code of each row's clip
    descriptors: torch.Tensor | None  # (N, D) mouth-eye descriptors for MaskFN (None when MaskFN is off)
    swapped: torch.Tensor  # (N,) bool, rows whose face was swapped onto a donor
    clips: int
    epoch: int
    index: int  # batch number within the epoch
    wait_s: float = 0.0  # time the training thread waited for the background threads
    ready: Any = None  # CUDA event of the worker stream that finished the batch (data.finish_in=workers)


@dataclass
class _ClipGroup:
    epoch: int
    index: int
    samples: list[dict[str, Any]]
    choices: list[tuple[int, ...]]  # frame positions per clip, in row-block order
    swap_p: float = 0.0  # FaceSwap probability for this batch (faceswap.p, ramped by faceswap.p_warmup_steps)


@dataclass
class HostBatch:
    """What the background threads hand over: raw bytes or decoded uint8 images, plus metadata."""

    epoch: int
    index: int
    keys: list[str]
    layout: str  # "sslfer" ([A, NA, P, NP]) or "simclr" ([A, P])
    landmarks: torch.Tensor  # (N, 68, 2) float32 in image_size pixels
    identity: torch.Tensor  # (B,) long
    jpegs: list[bytes] | None = None  # device decode path
    images: torch.Tensor | None = None  # CPU decode path: uint8 (N, 3, S, S)
    bad_rows: list[int] = field(default_factory=list)
    swap_p: float = 0.0  # FaceSwap probability for this batch


class BatchPipeline:
    """Iterable of :class:`Batch` for one rank; stateful (``state_dict``/``load_state_dict``)."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device | str = "cpu"):
        from pretrain.stream import ClipStream

        self.cfg = cfg
        self.data = cfg.data
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.layout = "sslfer" if cfg.sampling.hard_negatives else "simclr"
        self.rows_per_clip = 4 if self.layout == "sslfer" else 2
        self.decode_on_device = self.data.decode == "device" or (
            self.data.decode == "auto" and self.device.type == "cuda"
        )
        # On a CPU device the "device side" is CPU work too: the worker threads do it, a batch each (torch ops
        # release the GIL), so it overlaps the training step instead of running inside it. On a GPU the
        # training thread queues it on its stream (auto), or each worker thread on its own CUDA stream
        # (data.finish_in=workers), handing over an event the training stream waits for.
        finish_in = self.data.finish_in
        self.finish_in_workers = finish_in == "workers" or (finish_in == "auto" and self.device.type == "cpu")
        self._worker_streams = threading.local()
        if self.device.type == "cpu" and self.data.keep_freed_memory:
            from pretrain.allocator import keep_freed_memory

            keep_freed_memory()  # no page faults for every multi-megabyte temporary of the CPU batch ops
        self.skips = SkipCounter(logger=log)  # counts by reason, rate-limited warnings
        self.counters = self.skips.counts
        check_dataset_access(self.data.url)  # wrong credentials / endpoint: a clear error before training
        # One stream lane per rank: the worker threads here decode, they do not read shards.
        self.stream = ClipStream.from_config(
            self.data, rank=rank, world_size=world_size, num_workers=1,
            read_shard=resilient_reader(iter_samples, self.skips),
        )  # fmt: skip
        if self.steps_in_epoch(0) < 1:
            raise ValueError(
                f"data.url={self.data.url}: {self.stream.epoch_length(0)} clips per rank per epoch, fewer than "
                f"data.batch_clips={self.data.batch_clips}: lower data.batch_clips or use more data/fewer ranks"
            )
        self.sampler = FrameSampler(cfg.sampling)
        # Static shapes on a GPU: FaceSwap and the views compute every row and select, so no op waits for a
        # data-dependent size (a host sync that drains the stream); on a CPU only the rows that need an op pay.
        self.static_shapes = self.data.shapes == "static" or (
            self.data.shapes == "auto" and self.device.type == "cuda"
        )
        self.swap = FaceSwap(cfg.faceswap, static=self.static_shapes) if cfg.faceswap.enabled else None
        self.donor_bank = None  # faceswap.donors=bank: donors from a fixed bank, not from the batch
        if self.swap is not None and cfg.faceswap.donors == "bank":
            from pretrain.donors import load_donor_bank

            bank = load_donor_bank(
                self.data.url, cfg.faceswap.donor_bank_frames, self.data.image_size,
                resilient_reader(iter_samples, self.skips), self.skips,
            )  # fmt: skip
            self.donor_bank = bank.to(self.device)
        self.augment = ViewAugmenter(cfg.augment, static=self.static_shapes)
        self.descriptor = (
            _build_descriptor(cfg).to(self.device).eval() if cfg.loss.fn_mode != "none" else None
        )
        positive, group = batch_layout(self.data.batch_clips, self.layout)
        self.positive_index = positive.to(self.device)
        self.group_id = group.to(self.device)
        self._lock = threading.Lock()
        self._epoch, self._index = 0, 0  # next batch to yield
        self._stream_state: dict[str, Any] | None = None  # stream position after the last consumed batch
        self._threads: _Prefetcher | None = None

    def steps_in_epoch(self, epoch: int) -> int:
        """Batches per rank in ``epoch`` (the same on every rank; may vary a little between epochs)."""
        return self.stream.epoch_length(epoch) // self.data.batch_clips

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "index": self._index,
            "stream": self._stream_state,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data state version {state.get('version')} != {STATE_VERSION}: cannot resume it"
            )
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"data state of rank {state['rank']}/{state['world_size']} loaded on rank "
                f"{self.rank}/{self.world_size}: resume with the same number of ranks"
            )
        self.close()
        self._epoch, self._index = state["epoch"], state["index"]
        self._stream_state = state["stream"]
        self.skips.counts = self.counters = Counter(state.get("counters", {}))

    def skipped(self) -> dict[str, int]:
        """Cumulative counts of skipped/repaired input by reason (see the module docstring)."""
        with self._lock:
            out = Counter(self.counters)
        out.update(self.sampler.counters)
        out.update(self.stream.counters)
        return dict(out)

    def skipped_counts(self) -> dict[str, int]:
        """Alias of :meth:`skipped` (the name the metrics exporter uses)."""
        return self.skipped()

    # ------------------------------------------------------------------ reading (background)
    def _groups(self, epoch: int, index: int, stream_state):
        """Clip groups from (epoch, index) on, forever; yields (group, stream state after it)."""
        b = self.data.batch_clips
        while True:
            if stream_state is not None and index > 0:
                self.stream.load_state_dict(stream_state)
            else:
                self.stream.set_epoch(epoch)
            clips = iter(self.stream)
            refills = 0
            steps = self.steps_in_epoch(epoch)
            steps_before = self.total_steps(epoch) if self.cfg.faceswap.p_warmup_steps else 0
            while index < steps:
                rng = make_rng(self.cfg.seed, epoch, self.rank, index)
                samples, choices = [], []
                while len(samples) < b:
                    sample = next(clips, None)
                    if sample is None:  # skipped clips left this rank short: top up from its epoch start
                        refills += 1
                        if refills > 1 + steps:
                            raise RuntimeError(
                                f"rank {self.rank}: no usable clips in epoch {epoch} of {self.data.url} "
                                "(every clip is skipped by sampling.short_clip_policy?)"
                            )
                        with self._lock:
                            self.counters["epoch_refill"] += 1
                        self.stream.set_epoch(epoch)
                        clips = iter(self.stream)
                        continue
                    choice = self._choose(sample, rng)
                    if choice is None:
                        continue
                    samples.append(sample)
                    choices.append(choice)
                state = self.stream.state_dict()
                swap_p = self.swap_probability(steps_before + index)
                yield _ClipGroup(epoch, index, samples, choices, swap_p), state
                index += 1
            epoch, index, stream_state = epoch + 1, 0, None

    def swap_probability(self, step: int) -> float:
        """FaceSwap probability of the ``step``-th batch of the run (0-based): ``faceswap.p``, ramped up linearly
        from 0 over ``faceswap.p_warmup_steps``. A function of the batch position only, so resume is exact."""
        swap = self.cfg.faceswap
        if not swap.enabled:
            return 0.0
        if swap.p_warmup_steps <= 0:
            return swap.p
        return swap.p * min(1.0, step / swap.p_warmup_steps)

    def _choose(self, sample: dict[str, Any], rng) -> tuple[int, ...] | None:
        frames, meta = sample["frames"], sample["meta"]
        reason = validate_landmarks(meta, len(frames))
        if reason is not None:
            self.skips(reason, f"clip {sample.get('key')}: landmarks must be ({len(frames)}, 68, 2) numbers")
            return None
        try:
            fps = float(meta.get("fps") or 25.0 / 6.0)
        except (TypeError, ValueError):
            fps = 25.0 / 6.0
        choice = self.sampler.sample_clip(len(frames), fps, rng)
        if choice is None:
            return None
        if self.layout == "sslfer":
            return (choice.anchor, choice.hard_anchor, choice.positive, choice.hard_positive)
        return (choice.anchor, choice.positive)

    def prepare(self, group: _ClipGroup) -> HostBatch:
        """Row-ordered bytes/images and landmarks of one clip group (runs in a worker thread)."""
        size = self.data.image_size
        jpegs: list[bytes] = []
        landmarks = []
        for block in range(self.rows_per_clip):
            for sample, choice in zip(group.samples, group.choices):
                pos = choice[block]
                meta = sample["meta"]
                jpegs.append(sample["frames"][pos])
                scale = size / float(meta.get("size") or size)
                landmarks.append(np.asarray(meta["landmarks"][pos], dtype=np.float32) * scale)
        host = HostBatch(
            epoch=group.epoch,
            index=group.index,
            keys=[s["key"] for s in group.samples],
            layout=self.layout,
            landmarks=torch.from_numpy(np.stack(landmarks)),
            identity=torch.tensor(
                [identity_code(s["meta"].get("identity_id", s["key"])) for s in group.samples]
            ),
            swap_p=group.swap_p,
        )
        if self.decode_on_device:
            host.jpegs = jpegs
        else:
            host.images, host.bad_rows = self._decode(jpegs, "cpu")
            if self.device.type == "cuda":
                host.images = host.images.pin_memory()
        return host

    def _decode(self, jpegs: list[bytes], device) -> tuple[torch.Tensor, list[int]]:
        images, bad = decode_jpegs_skipping(jpegs, device, self.data.image_size)
        if not bad:
            return images, []
        for i in bad:
            self.skips("corrupt_jpeg", f"row {i} of a batch: replaced by another frame of the same clip")
        if images is None:
            raise RuntimeError(f"every JPEG of a batch failed to decode ({len(jpegs)} images)")
        # Keep the batch shape: a corrupt frame is replaced by another decoded row of the same clip (or any).
        b = self.data.batch_clips
        good = [i for i in range(len(jpegs)) if i not in set(bad)]
        full = torch.empty((len(jpegs), *images.shape[1:]), dtype=images.dtype, device=images.device)
        full[good] = images
        for i in bad:
            same_clip = [j for j in good if j % b == i % b]
            full[i] = full[(same_clip or good)[0]]
        return full, bad

    # ------------------------------------------------------------------ device side
    def finish(self, host: HostBatch, wait_s: float = 0.0) -> Batch:
        """Decode (device path), FaceSwap the positives, augment both families, descriptors."""
        device = self.device
        images = self._device_images(host)
        landmarks = host.landmarks.to(device, non_blocking=True)
        n = images.shape[0]
        half = n // 2  # anchors (A, NA) first, positives (P, NP) second, in both layouts
        identity = host.identity.to(device).repeat(self.rows_per_clip)
        gen = torch.Generator(device=device)
        gen.manual_seed(device_seed(self.cfg.seed, host.epoch, self.rank, host.index))

        swapped = torch.zeros(n, dtype=torch.bool, device=device)
        view_landmarks = landmarks
        positives, positive_landmarks = images[half:], landmarks[half:]
        if self.swap is not None:
            # Donors: any entry of another identity - in the donor bank, or a row of the batch (before swapping).
            bank = self.donor_bank
            donors = (
                (images, landmarks, identity)
                if bank is None
                else (bank.images, bank.landmarks, bank.identity)
            )
            result = self.swap(
                positives, positive_landmarks, identity[half:], gen,
                donor_images=donors[0], donor_landmarks=donors[1], donor_identity=donors[2], p=host.swap_p,
            )  # fmt: skip
            positives, positive_landmarks = result.images, result.landmarks
            swapped[half:] = result.swapped
            view_landmarks = torch.cat([landmarks[:half], positive_landmarks])
        views = self._views(images[:half], view_landmarks[:half], positives, positive_landmarks, gen)
        if self.cfg.augment.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        descriptors = None
        if self.descriptor is not None:  # from the un-augmented source frames: the expression, not the view
            with torch.no_grad():
                descriptors = self.descriptor(images, landmarks)
        return Batch(
            images=views,
            positive_index=self.positive_index,
            group_id=self.group_id,
            identity=identity,
            descriptors=descriptors,
            swapped=swapped,
            clips=self.data.batch_clips,
            epoch=host.epoch,
            index=host.index,
            wait_s=wait_s,
        )

    def prepare_job(self, group: _ClipGroup) -> HostBatch | Batch:
        """What a worker thread does with a clip group: host data, or the finished batch on a CPU device."""
        host = self.prepare(group)
        if not self.finish_in_workers:
            return host
        if self.device.type != "cuda":
            return self.finish(host)
        stream = getattr(self._worker_streams, "stream", None)
        if stream is None:
            stream = self._worker_streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            batch = self.finish(host)
            batch.ready = torch.cuda.Event()
            batch.ready.record(stream)
        return batch

    def _hand_over(self, batch: Batch) -> None:
        """A batch finished on a worker's CUDA stream: the training stream waits for it, and the allocator
        learns that its tensors are used there (so their memory is not reused by the worker stream early)."""
        if batch.ready is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(batch.ready)
        for tensor in (batch.images, batch.identity, batch.descriptors, batch.swapped):
            if tensor is not None:
                tensor.record_stream(current)
        batch.ready = None

    def _device_images(self, host: HostBatch) -> torch.Tensor:
        """uint8 (N, 3, S, S) on the device: decode here (device path) or move the threads' CPU decode."""
        if host.jpegs is not None:
            return self._decode(host.jpegs, self.device)[0]
        return host.images.to(self.device, non_blocking=True)

    def _views(self, anchors, anchor_landmarks, positives, positive_landmarks, gen) -> torch.Tensor:
        """Family "first" on the anchors (A, NA), "second" on the (swapped) positives (P, NP)."""
        first = self.augment(anchors, anchor_landmarks, "first", gen)
        second = self.augment(positives, positive_landmarks, "second", gen)
        return torch.cat([first, second])

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self.close()
        self._threads = _Prefetcher(self, self._epoch, self._index, self._stream_state)
        try:
            while True:
                t0 = time.perf_counter()
                item, stream_state = self._threads.get()
                wait_s = time.perf_counter() - t0
                if isinstance(item, Batch):  # finished by a worker thread (data.finish_in)
                    batch, batch.wait_s = item, wait_s
                    self._hand_over(batch)
                else:
                    batch = self.finish(item, wait_s)
                # Consumed: a checkpoint taken now resumes at the next batch.
                self._epoch, self._index = batch.epoch, batch.index + 1
                if self._index >= self.steps_in_epoch(batch.epoch):
                    self._epoch, self._index, stream_state = batch.epoch + 1, 0, None
                self._stream_state = stream_state
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.stop()
            self._threads = None


class DaliBatchPipeline(BatchPipeline):
    """``data.pipeline=dali``: DALI decode -> batched torch FaceSwap on the device -> DALI augmentation.

    Same stream, sampling, row order, FaceSwap and descriptors as :class:`BatchPipeline`; only decoding and
    the view augmentations run in DALI (``mixed``/GPU operators on CUDA, CPU operators otherwise). The
    arrangement and the resume bound are documented in ``pretrain/dali_pipeline.py``.
    """

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device | str = "cpu"):
        super().__init__(cfg, rank, world_size, device)
        self.decode_on_device = True  # the background threads hand over JPEG bytes; DALI decodes them
        # DALI pipelines are not thread-safe: each thread that finishes batches builds its own pair of stages
        # (on CUDA only the training thread; on the CPU every worker thread, one DALI thread each).
        self._local = threading.local()
        self.dali_threads = 1 if self.finish_in_workers else max(1, self.data.num_workers)

    def _stages(self, host: HostBatch):
        stages = getattr(self._local, "stages", None)
        if stages is None:
            from pretrain.dali_pipeline import DaliStages

            stages = self._local.stages = DaliStages(
                self.cfg.augment, self.device, self.data.batch_clips * self.rows_per_clip,
                self.data.image_size, self.dali_threads, seed=0,  # DALI draws nothing at random here
            )  # fmt: skip
        return stages

    def _device_images(self, host: HostBatch) -> torch.Tensor:
        stages = self._stages(host)
        jpegs = list(host.jpegs)
        try:
            return stages.decode(jpegs)
        except RuntimeError:
            pass
        # Some JPEG is corrupt: find which with the CPU decoder, substitute frames of the same clip, rerun.
        _, bad = decode_jpegs_skipping(jpegs, "cpu", self.data.image_size)
        good = [i for i in range(len(jpegs)) if i not in set(bad)]
        if not bad or not good:
            raise RuntimeError(f"DALI could not decode a batch of {len(jpegs)} JPEGs (keys {host.keys})")
        b = self.data.batch_clips
        for i in bad:
            self.skips("corrupt_jpeg", f"row {i} of a batch: replaced by another frame of the same clip")
            same_clip = [j for j in good if j % b == i % b]
            jpegs[i] = jpegs[(same_clip or good)[0]]
        return stages.decode(jpegs)

    def _views(self, anchors, anchor_landmarks, positives, positive_landmarks, gen) -> torch.Tensor:
        cfg = self.cfg.augment
        images = torch.cat([anchors, positives])
        landmarks = torch.cat([anchor_landmarks, positive_landmarks]).float()
        size = images.shape[-1]
        # Every random parameter from the batch's seeded generator, in the torch path's order (anchors' family
        # first, then the positives'): both paths draw the same crops, flips, masks and colour factors.
        scale = (cfg.resize / size, cfg.resize / size)
        params = ViewParams.cat(
            [self.augment.draw_params(x.shape[0], family, gen, scale, "cpu")
             for x, family in ((anchors, "first"), (positives, "second"))]
        )  # fmt: skip
        region = params.mask_region.to(images.device)
        masks = ellipse_masks(
            landmarks.to(images.device), region, size, size, cfg.mask_scale, cfg.mask_min_aspect
        )
        masks &= params.mask.to(images.device)[:, None, None]
        return self._stages_ready().augment(images, masks, params)

    def _stages_ready(self):
        stages = getattr(self._local, "stages", None)
        assert stages is not None  # built by _device_images of the same batch, in the same thread
        return stages

    def close(self) -> None:
        super().close()
        self._local = threading.local()  # releases the DALI pipelines (and their device memory)


class _Prefetcher:
    """Reader thread + worker pool; hands out prepared batches strictly in order."""

    def __init__(self, pipeline: BatchPipeline, epoch: int, index: int, stream_state):
        self.pipeline = pipeline
        workers = pipeline.data.num_workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch") if workers else None
        self.inline = None
        self.futures: queue.Queue = queue.Queue(maxsize=pipeline.data.prefetch)
        self._stop = threading.Event()
        groups = pipeline._groups(epoch, index, stream_state)
        if self.pool is None:
            self.inline = groups  # num_workers=0: everything in the training thread (debugging)
            self.thread = None
        else:
            self.thread = threading.Thread(target=self._read, args=(groups,), name="clip-reader", daemon=True)
            self.thread.start()

    def _read(self, groups) -> None:
        try:
            for group, state in groups:
                future = self.pool.submit(self.pipeline.prepare_job, group)
                while not self._stop.is_set():
                    try:
                        self.futures.put((future, state), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # surface reader errors (bad store, no data) in the training thread
            failed: Future = Future()
            failed.set_exception(err)
            self.futures.put((failed, None))

    def get(self) -> tuple[HostBatch | Batch, Any]:
        if self.inline is not None:
            group, state = next(self.inline)
            return self.pipeline.prepare_job(group), state
        future, state = self.futures.get()
        return future.result(), state

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.futures.get_nowait()
                except queue.Empty:
                    self.thread.join(timeout=0.05)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _build_descriptor(cfg):
    """The MaskFN descriptor callable ``landmarks (N,68,2) -> (N, D)`` from ``cfg.descriptors``."""
    from pretrain import descriptors

    return descriptors.build_descriptor(cfg.descriptors)
