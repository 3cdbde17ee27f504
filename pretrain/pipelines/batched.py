"""The batched half of the torch and DALI pipelines: whole-batch FaceSwap, views and descriptors on the device.

Work is split where it runs best:

* a reader thread walks this rank's clip groups (:class:`pretrain.pipelines.base.ClipBatchPipeline`);
* ``data.num_workers`` threads (:class:`pretrain.pipelines.prefetch.Prefetcher`) turn a group into host data
  (:class:`pretrain.pipelines.clips.HostBatch`): the JPEG bytes in row order, or - when a subclass decodes in
  the background - already decoded uint8 images (libjpeg releases the GIL, so threads decode in parallel);
* the training thread finishes it on the device: decode (when not done yet), FaceSwap on the positives,
  augmentation family "first" on anchors and "second" on positives, mouth-eye descriptors for MaskFN. When the
  device is the CPU, the worker threads finish their batch themselves (``finish_in_workers``): the work is CPU
  work either way, and done there it overlaps the training step and spreads over the workers.

Subclasses say how a batch's images are decoded (:meth:`BatchedPipeline.device_images`) and how the two view
families are made (:meth:`BatchedPipeline.views`); every random draw comes from the batch's generator seeded
by ``(seed, epoch, rank, batch)``.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from pretrain.dataset import Dataset
from pretrain.faceswap import FaceSwap
from pretrain.pipelines.base import Batch, ClipBatchPipeline
from pretrain.pipelines.clips import ClipGroup, HostBatch, clip_identity, device_seed, frame_landmarks
from pretrain.pipelines.prefetch import Prefetcher


class BatchedPipeline(ClipBatchPipeline):
    """Clip groups -> host batches in background threads -> finished on the device, a whole batch at a time."""

    def __init__(
        self,
        cfg,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        dataset: Dataset | None = None,
    ):
        super().__init__(cfg, rank, world_size, device, dataset)
        # On a CPU device the "device side" is CPU work too: the worker threads do it, a batch each (torch ops
        # release the GIL), so it overlaps the training step instead of running inside it. On a GPU the
        # training thread queues it on its stream (auto), or each worker thread on its own CUDA stream
        # (data.finish_in=workers), handing over an event the training stream waits for.
        finish_in = self.data.finish_in
        self.finish_in_workers = finish_in == "workers" or (finish_in == "auto" and self.device.type == "cpu")
        self._worker_streams = threading.local()
        # Static shapes on a GPU: FaceSwap and the views compute every row and select, so no op waits for a
        # data-dependent size (a host sync that drains the stream); on a CPU only the rows that need an op pay.
        self.static_shapes = self.data.shapes == "static" or (
            self.data.shapes == "auto" and self.device.type == "cuda"
        )
        self.swap = FaceSwap(cfg.faceswap, static=self.static_shapes) if cfg.faceswap.enabled else None
        self._threads: Prefetcher | None = None

    # ------------------------------------------------------------------ what subclasses supply
    @abstractmethod
    def device_images(self, host: HostBatch) -> torch.Tensor:
        """uint8 (N, 3, S, S) on the device, every row decoded (a corrupt frame replaced, counted)."""

    @abstractmethod
    def views(self, anchors, anchor_landmarks, positives, positive_landmarks, gen) -> torch.Tensor:
        """Family "first" on the anchors (A, NA), "second" on the (swapped) positives (P, NP), concatenated."""

    def decode_in_background(self, host: HostBatch) -> None:
        """Hook for a worker thread to decode ``host.jpegs`` into ``host.images``; by default they travel as bytes."""

    # ------------------------------------------------------------------ host side (background)
    def prepare(self, group: ClipGroup) -> HostBatch:
        """Row-ordered bytes and landmarks of one clip group (runs in a worker thread)."""
        rows = group.rows()
        host = HostBatch(
            epoch=group.epoch,
            index=group.index,
            keys=[s["key"] for s in group.samples],
            layout=self.layout,
            landmarks=torch.from_numpy(
                np.stack([frame_landmarks(sample, pos, self.data.image_size) for sample, pos in rows])
            ),
            identity=torch.tensor([clip_identity(s) for s in group.samples]),
            jpegs=[sample["frames"][pos] for sample, pos in rows],
            swap_p=group.swap_p,
        )
        self.decode_in_background(host)
        return host

    # ------------------------------------------------------------------ device side
    def finish(self, host: HostBatch, wait_s: float = 0.0) -> Batch:
        """Decode (if not done yet), FaceSwap the positives, augment both families, descriptors."""
        device = self.device
        images = self.device_images(host)
        landmarks = host.landmarks.to(device, non_blocking=True)
        n = images.shape[0]
        half = n // 2  # anchors (A, NA) first, positives (P, NP) second, in both layouts
        identity = host.identity.to(device).repeat(self.rows_per_clip)
        gen = torch.Generator(device=device)
        gen.manual_seed(device_seed(self.cfg.seed, host.epoch, self.rank, host.index))

        swapped = torch.zeros(n, dtype=torch.bool, device=device)
        donor_row = None
        view_landmarks = landmarks
        positives, positive_landmarks = images[half:], landmarks[half:]
        if self.swap is not None:
            # Donors: any entry of another identity - in the donor set (stream/bank), or a row of the batch
            # (before swapping). Stream donors also exclude every identity of this (local) batch.
            bank, exclude = self.donors_at(host.epoch, host.index)
            donors = (
                (images, landmarks, identity)
                if bank is None
                else (bank.images, bank.landmarks, bank.identity)
            )
            allowed = ~torch.isin(bank.identity, identity) if exclude else None
            result = self.swap(
                positives, positive_landmarks, identity[half:], gen,
                donor_images=donors[0], donor_landmarks=donors[1], donor_identity=donors[2], p=host.swap_p,
                donor_allowed=allowed,
            )  # fmt: skip
            positives, positive_landmarks = result.images, result.landmarks
            swapped[half:] = result.swapped
            donor_row = torch.full((n,), -1, dtype=torch.long, device=device)
            if bank is None:  # the donors were rows of this batch (before swapping)
                donor_row[half:] = result.donor_index
            view_landmarks = torch.cat([landmarks[:half], positive_landmarks])
        views = self.views(images[:half], view_landmarks[:half], positives, positive_landmarks, gen)
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
            donor_row=donor_row,
            clips=self.data.batch_clips,
            epoch=host.epoch,
            index=host.index,
            wait_s=wait_s,
        )

    def prepare_job(self, group: ClipGroup) -> HostBatch | Batch:
        """What a worker thread does with a clip group: host data, or the finished batch (finish_in_workers)."""
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
        for tensor in (batch.images, batch.identity, batch.descriptors, batch.swapped, batch.donor_row):
            if tensor is not None:
                tensor.record_stream(current)
        batch.ready = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        self.close()
        self._threads = Prefetcher(
            self.clip_groups(),
            self.prepare_job,
            workers=self.data.num_workers,
            depth=self.data.prefetch,
            priority=self.data.input_priority,
        )
        try:
            while True:
                t0 = time.perf_counter()
                item, stream_state = self._threads.get()
                # inline (num_workers=0) the input is this thread's own work, not a wait: input_prep_fraction
                wait_s = 0.0 if self._threads.inline is not None else time.perf_counter() - t0
                if isinstance(item, Batch):  # finished by a worker thread (data.finish_in)
                    batch, batch.wait_s = item, wait_s
                    self._hand_over(batch)
                else:
                    batch = self.finish(item, wait_s)
                self.consumed(batch.epoch, batch.index, stream_state)
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.stop()
            self._threads = None
