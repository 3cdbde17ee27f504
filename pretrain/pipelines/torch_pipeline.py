"""``data.pipeline=torch``: torchvision/nvjpeg decode and batched torch augmentation (the default).

JPEGs are decoded where ``data.decode`` says: in the worker threads with libjpeg (``cpu``, the default on a CPU
device), or where the batch is finished (``device``, the default on CUDA: nvjpeg, one call per batch). The two
view families come from :class:`pretrain.augment.ViewAugmenter`, one batched call each. The rest (threads,
FaceSwap, descriptors) is :class:`pretrain.pipelines.batched.BatchedPipeline`.
"""

from __future__ import annotations

import torch

from pretrain.augment import ViewAugmenter
from pretrain.dataset import Dataset
from pretrain.decode import decode_jpegs_skipping
from pretrain.pipelines.batched import BatchedPipeline
from pretrain.pipelines.clips import HostBatch, replacement_row


class TorchBatchPipeline(BatchedPipeline):
    """Iterable of :class:`pretrain.pipelines.base.Batch` for one rank, decoded and augmented by torch ops."""

    def __init__(
        self,
        cfg,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        dataset: Dataset | None = None,
    ):
        super().__init__(cfg, rank, world_size, device, dataset)
        self.decode_on_device = self.data.decode == "device" or (
            self.data.decode == "auto" and self.device.type == "cuda"
        )
        self.augment = ViewAugmenter(cfg.augment, static=self.static_shapes)

    def decode_in_background(self, host: HostBatch) -> None:
        if self.decode_on_device:
            return
        host.images, host.bad_rows = self._decode(host.jpegs, "cpu")
        host.jpegs = None
        if self.device.type == "cuda":
            host.images = host.images.pin_memory()

    def device_images(self, host: HostBatch) -> torch.Tensor:
        if host.jpegs is not None:
            return self._decode(host.jpegs, self.device)[0]
        return host.images.to(self.device, non_blocking=True)

    def _decode(self, jpegs: list[bytes], device) -> tuple[torch.Tensor, list[int]]:
        images, bad = decode_jpegs_skipping(jpegs, device, self.data.image_size)
        if not bad:
            return images, []
        for i in bad:
            self.skips("corrupt_jpeg", f"row {i} of a batch: replaced by another frame of the same clip")
        if images is None:
            raise RuntimeError(f"every JPEG of a batch failed to decode ({len(jpegs)} images)")
        # Keep the batch shape: a corrupt frame is replaced by another decoded row of the same clip (or any).
        good = [i for i in range(len(jpegs)) if i not in set(bad)]
        full = torch.empty((len(jpegs), *images.shape[1:]), dtype=images.dtype, device=images.device)
        full[good] = images
        for i in bad:
            full[i] = full[replacement_row(i, good, self.data.batch_clips)]
        return full, bad

    def views(self, anchors, anchor_landmarks, positives, positive_landmarks, gen) -> torch.Tensor:
        return self.augment.pair(anchors, anchor_landmarks, positives, positive_landmarks, gen)
