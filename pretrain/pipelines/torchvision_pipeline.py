"""``data.pipeline=torchvision``: the plain baseline - per-sample PIL + torchvision transforms in a torch DataLoader.

The same work as the torch pipeline (:mod:`pretrain.pipelines.torch_pipeline`), done the way a typical PyTorch
project does it, so the benchmark has an honest reference and users have a fallback that needs nothing beyond
torchvision:

* the same :class:`pretrain.stream.ClipStream`, frame sampler and clip groups
  (:class:`pretrain.pipelines.base.ClipBatchPipeline`; the reader runs in the main process as the DataLoader's
  *sampler*: each "index" it yields is one clip group with its JPEG bytes);
* DataLoader workers (``data.num_workers`` processes, ``batch_size=None``) turn a group into a batch, one image
  at a time: PIL decode -> FaceSwap of each positive (P, NP) with probability ``faceswap.p`` onto a donor of
  another identity (from the donor set that travels with the group, or a row of the batch), with the per-sample NumPy/SciPy recipe :func:`pretrain.faceswap.face_swap_reference` (what
  the original code did with OpenCV) -> landmark-ellipse mask drawn with PIL and filled with the image mean ->
  ``Resize`` / ``RandomCrop`` / ``RandomHorizontalFlip`` / ``ColorJitter`` (always for the first family when
  ``augment.jitter_always_first_family``) / ``GaussianBlur`` / ``RandomGrayscale`` / ``ToTensor`` /
  ``Normalize``, family "first" on A/NA and "second" on P/NP;
* the main process adds the mouth-eye descriptors (from the unswapped frames, as the other paths).

Differences from the batched paths (same distributions, different pixels): torchvision's hue jitter rotates
in HSV (the torch and DALI paths use YIQ), and its blur kernel size is fixed at ``2 * ceil(3 * sigma_max) + 1``.

Determinism and resume: each batch seeds ``torch``, ``random`` and NumPy from ``(seed, epoch, rank, batch)``
before its per-sample draws, so a batch does not depend on which worker made it, and the DataLoader returns
batches in order; the pipeline state is the stream position after the last batch the trainer consumed (as
in the torch path). A resumed run reproduces the uninterrupted one exactly. Skip counts made in the workers
(corrupt JPEGs) travel back with each batch and are added to :meth:`skipped_counts` in the main process.
"""

from __future__ import annotations

import io
import random
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_shards.jpeg_header import check_jpeg, max_side_for
from pretrain.augment import MASK_REGIONS, AugmentConfig
from pretrain.faceswap import FaceSwapConfig, face_swap_reference
from pretrain.pipelines.base import Batch, ClipBatchPipeline
from pretrain.pipelines.clips import ClipGroup, clip_identity, device_seed, frame_landmarks, replacement_row
from pretrain.pipelines.prefetch import lower_input_priority


class TorchvisionViews:
    """Per-image torchvision transforms for the two view families, plus the PIL landmark mask."""

    def __init__(self, cfg: AugmentConfig):
        from torchvision import transforms as T

        self.cfg = cfg
        b, c, s, h = cfg.jitter
        jitter = T.ColorJitter(b, c, s, h)
        blur = T.RandomApply(
            [T.GaussianBlur(2 * int(np.ceil(3 * cfg.blur_sigma[1])) + 1, cfg.blur_sigma)], p=cfg.blur_p
        )
        head = [T.Resize(cfg.resize), T.RandomCrop(cfg.crop), T.RandomHorizontalFlip(cfg.flip_p)]
        tail = [T.RandomGrayscale(cfg.gray_p), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
        first_jitter = jitter if cfg.jitter_always_first_family else T.RandomApply([jitter], p=cfg.jitter_p)
        self.first = T.Compose([*head, first_jitter, blur, *tail])
        self.second = T.Compose([*head, T.RandomApply([jitter], p=cfg.jitter_p), blur, *tail])

    def mask(self, image: Image.Image, landmarks: np.ndarray, rng: np.random.Generator) -> Image.Image:
        cfg = self.cfg
        if rng.random() >= cfg.mask_p:
            return image
        pts = landmarks[list(MASK_REGIONS[int(rng.integers(len(MASK_REGIONS)))])]
        lo, hi = pts.min(0), pts.max(0)
        centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2 * cfg.mask_scale, 1.0)
        half[1] = max(half[1], half[0] * cfg.mask_min_aspect)
        mean = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))
        image = image.copy()
        ImageDraw.Draw(image).ellipse([*(centre - half), *(centre + half)], fill=mean)
        return image

    def __call__(self, image: Image.Image, landmarks: np.ndarray, family: str, rng) -> torch.Tensor:
        image = self.mask(image, landmarks, rng)
        return (self.first if family == "first" else self.second)(image)


class _GroupSampler:
    """The DataLoader's sampler: clip groups from the pipeline's reader; remembers each group's stream state."""

    def __init__(self, groups, states: dict[tuple[int, int], Any], donors_for=None):
        self.groups, self.states, self.donors_for = groups, states, donors_for

    def __iter__(self):
        for group, state in self.groups:
            self.states[(group.epoch, group.index)] = state
            # donors=stream: the group travels with its donor set (the batch's identities left out)
            yield group, (self.donors_for(group) if self.donors_for is not None else None)


class _GroupToBatch(torch.utils.data.Dataset):
    """Runs in the DataLoader workers: one clip group -> one batch of views, per sample."""

    def __init__(self, cfg, rank: int, rows_per_clip: int, layout: str, bank=None):
        self.cfg, self.rank, self.rows_per_clip, self.layout = cfg, rank, rows_per_clip, layout
        self.bank = bank.numpy() if bank is not None else None  # faceswap.donors=bank: (images, lms, ids)
        self.size = cfg.data.image_size
        self.views = TorchvisionViews(cfg.augment)
        self.swap_cfg: FaceSwapConfig | None = cfg.faceswap if cfg.faceswap.enabled else None

    def _decode(self, jpeg: bytes) -> Image.Image:
        check_jpeg(jpeg, max_side_for(self.size))  # BadJpeg (a ValueError) before PIL allocates a bomb
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return image

    def __getitem__(self, item: tuple[ClipGroup, Any]) -> dict[str, Any]:
        group, stream_donors = item
        seed = device_seed(self.cfg.seed, group.epoch, self.rank, group.index)
        torch.manual_seed(seed)
        random.seed(seed)
        rng = np.random.default_rng(seed)
        b = len(group.samples)
        skips: Counter[str] = Counter()
        pil: list[Image.Image | None] = []
        landmarks = []
        for sample, pos in group.rows():
            try:
                pil.append(self._decode(sample["frames"][pos]))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                pil.append(None)
            landmarks.append(frame_landmarks(sample, pos, self.size))
        good = [i for i, im in enumerate(pil) if im is not None]
        if not good:
            raise RuntimeError(f"every JPEG of a batch failed to decode ({len(pil)} images)")
        for i, im in enumerate(pil):
            if im is None:  # as the torch path: another decoded frame of the same clip
                skips["corrupt_jpeg"] += 1
                pil[i] = pil[replacement_row(i, good, b)]
        n = len(pil)
        half = n // 2
        identity = np.array([clip_identity(s) for s in group.samples])
        row_identity = np.tile(identity, self.rows_per_clip)
        sources = [np.asarray(im) for im in pil]  # unswapped uint8 frames (descriptors, donors)
        swapped = np.zeros(n, dtype=bool)
        donor_row = np.full(n, -1, dtype=np.int64)  # stays -1 for donors from outside the batch
        faces, face_landmarks = list(pil), list(landmarks)
        if self.swap_cfg is not None:
            in_batch = stream_donors is None and self.bank is None
            pool_images, pool_landmarks, pool_identity = (
                stream_donors
                if stream_donors is not None
                else (sources, landmarks, row_identity)
                if self.bank is None
                else self.bank
            )
            for i in range(half, n):  # positives (P, NP), one at a time
                donors = np.flatnonzero(pool_identity != row_identity[i])
                if rng.random() >= group.swap_p or donors.size == 0:
                    continue
                d = int(rng.choice(donors))
                out, out_lm, _ = face_swap_reference(
                    sources[i].astype(np.float64), landmarks[i].astype(np.float64),
                    np.asarray(pool_images[d], np.float64), np.asarray(pool_landmarks[d], np.float64),
                    self.swap_cfg,
                )  # fmt: skip
                faces[i] = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
                face_landmarks[i] = out_lm.astype(np.float32)
                swapped[i] = True
                if in_batch:
                    donor_row[i] = d
        views = torch.stack(
            [
                self.views(faces[i], face_landmarks[i], "first" if i < half else "second", rng)
                for i in range(n)
            ]
        )
        return {
            "views": views,
            "images": torch.from_numpy(np.stack(sources)).permute(0, 3, 1, 2).contiguous(),
            "landmarks": torch.from_numpy(np.stack(landmarks)),
            "identity": torch.from_numpy(row_identity).long(),
            "swapped": torch.from_numpy(swapped),
            "donor_row": torch.from_numpy(donor_row) if self.swap_cfg is not None else None,
            "epoch": group.epoch,
            "index": group.index,
            "skips": dict(skips),
        }


class TorchvisionBatchPipeline(ClipBatchPipeline):
    """The pipeline interface and clip groups of the other pipelines, with the per-sample torchvision DataLoader
    inside."""

    _loader_iter = None  # the DataLoader iterator of the epoch being read

    def __iter__(self):
        self.close()
        states: dict[tuple[int, int], Any] = {}
        groups = self.clip_groups()
        workers = self.data.num_workers
        loader = torch.utils.data.DataLoader(
            _GroupToBatch(self.cfg, self.rank, self.rows_per_clip, self.layout, self.donor_bank),
            sampler=_GroupSampler(groups, states, self._stream_donors if self.donor_stream else None),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=max(1, self.data.prefetch // max(1, workers)) if workers else None,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=lower_input_priority if self.data.input_priority == "idle" else None,
        )
        self._loader_iter = it = iter(loader)
        try:
            while True:
                t0 = time.perf_counter()
                item = next(it)
                wait_s = time.perf_counter() - t0 if workers else 0.0  # inline: input is this thread's work
                batch = self._finish_item(item, wait_s)
                epoch, index = item["epoch"], item["index"]
                self.consumed(epoch, index, states.pop((epoch, index)))
                yield batch
        finally:
            self.close()

    def _stream_donors(self, group: ClipGroup):
        """The numpy donor set of ``group`` (donors=stream), every identity of the group left out."""
        bank, _ = self.donors_at(group.epoch, group.index)
        if bank is None:
            return None  # an unusable set (counted): the batch's own rows
        if getattr(self, "_numpy_set", (None,))[0] is not bank:
            self._numpy_set = (bank, bank.numpy())
        images, landmarks, identity = self._numpy_set[1]
        keep = ~np.isin(identity, [clip_identity(s) for s in group.samples])
        return images[keep], landmarks[keep], identity[keep]

    def _finish_item(self, item: dict[str, Any], wait_s: float) -> Batch:
        for reason, count in item["skips"].items():
            for _ in range(count):
                self.skips(reason, "row of a batch: replaced by another frame of the same clip")
        device = self.device
        views = item["views"].to(device, non_blocking=True)
        if self.cfg.augment.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        descriptors = None
        if self.descriptor is not None:
            with torch.no_grad():
                descriptors = self.descriptor(item["images"].to(device), item["landmarks"].to(device))
        return Batch(
            images=views,
            positive_index=self.positive_index,
            group_id=self.group_id,
            identity=item["identity"].to(device),
            descriptors=descriptors,
            swapped=item["swapped"].to(device),
            donor_row=item["donor_row"].to(device) if item["donor_row"] is not None else None,
            clips=self.data.batch_clips,
            epoch=int(item["epoch"]),
            index=int(item["index"]),
            wait_s=wait_s,
        )

    def close(self) -> None:
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
