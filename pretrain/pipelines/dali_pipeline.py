"""``data.pipeline=dali``: DALI decode -> batched torch FaceSwap on the device -> DALI augmentation.

Same stream, sampling, row order, FaceSwap and descriptors as the torch pipeline
(:class:`pretrain.pipelines.batched.BatchedPipeline`); only decoding and the view augmentations run in DALI
(``mixed``/GPU operators on CUDA, CPU operators otherwise), in the two stages of
:class:`pretrain.pipelines.dali_graph.DaliStages` (the arrangement is documented in ``dali_graph.py``).

The background threads hand over JPEG bytes. Every random view parameter is drawn by torch from the batch's
seeded generator, in the torch pipeline's order, and fed to DALI: for the same batch both pipelines use the same
crops, flips, masks and colour factors, and resume is exact.
"""

from __future__ import annotations

import threading

import torch

from pretrain.augment import ViewAugmenter, ellipse_masks
from pretrain.dataset import Dataset
from pretrain.decode import decode_jpegs_skipping
from pretrain.pipelines.batched import BatchedPipeline
from pretrain.pipelines.clips import HostBatch, replacement_row


class DaliBatchPipeline(BatchedPipeline):
    """Iterable of :class:`pretrain.pipelines.base.Batch` for one rank, decoded and augmented by DALI."""

    def __init__(
        self,
        cfg,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        dataset: Dataset | None = None,
    ):
        super().__init__(cfg, rank, world_size, device, dataset)
        # Draws the view parameters as the torch pipeline does; DALI applies them.
        self.augment = ViewAugmenter(cfg.augment, static=self.static_shapes)
        # DALI pipelines are not thread-safe: each thread that finishes batches builds its own pair of stages
        # (on CUDA only the training thread; on the CPU every worker thread, one DALI thread each).
        self._local = threading.local()
        self.dali_threads = 1 if self.finish_in_workers else max(1, self.data.num_workers)

    def _stages(self):
        stages = getattr(self._local, "stages", None)
        if stages is None:
            from pretrain.pipelines.dali_graph import DaliStages

            stages = self._local.stages = DaliStages(
                self.cfg.augment, self.device, self.data.batch_clips * self.rows_per_clip,
                self.data.image_size, self.dali_threads, seed=0,  # DALI draws nothing at random here
            )  # fmt: skip
        return stages

    def device_images(self, host: HostBatch) -> torch.Tensor:
        stages = self._stages()
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
        for i in bad:
            self.skips("corrupt_jpeg", f"row {i} of a batch: replaced by another frame of the same clip")
            jpegs[i] = jpegs[replacement_row(i, good, self.data.batch_clips)]
        return stages.decode(jpegs)

    def views(self, anchors, anchor_landmarks, positives, positive_landmarks, gen) -> torch.Tensor:
        cfg = self.cfg.augment
        images = torch.cat([anchors, positives])
        landmarks = torch.cat([anchor_landmarks, positive_landmarks]).float()
        size = images.shape[-1]
        # Every random parameter from the batch's seeded generator, as the torch path draws them: both paths
        # draw the same crops, flips, masks and colour factors.
        params = self.augment.draw_pair_params(anchors.shape[0], positives.shape[0], gen, size, size, "cpu")
        region = params.mask_region.to(images.device)
        masks = ellipse_masks(
            landmarks.to(images.device), region, size, size, cfg.mask_scale, cfg.mask_min_aspect
        )
        masks &= params.mask.to(images.device)[:, None, None]
        # The stages of this thread, built by device_images for the same batch.
        return self._stages().augment(images, masks, params)

    def close(self) -> None:
        super().close()
        self._local = threading.local()  # releases the DALI pipelines (and their device memory)
