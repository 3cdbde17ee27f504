"""DALI input pipeline: frame JPEGs + landmarks -> the paper's augmented views, on the CPU or the GPU.

The sampler has already chosen the frames, so DALI is fed by ``fn.external_source`` (batch mode,
``cycle="raise"``: without it every epoch after the first is silently empty). Each batch carries, per sample, the
JPEG bytes, the 68-point landmarks (pixel coords of the stored image) and the view family (``first`` = anchors A/NA,
``second`` = positives P/NP). One graph handles both families: the family only changes the jitter probability.

Ops, in order (``device="gpu"`` decodes with ``"mixed"`` (nvjpeg) and runs every later op on the GPU):

1. decode (``fn.decoders.image``, RGB);
2. landmark mask: the ellipse masks are rasterised on the feeding side by :func:`pretrain.augment.ellipse_masks`
   (one batched torch call per batch, region drawn per sample from a seeded generator) and applied in the graph
   as ``image * (1 - m) + mean(image) * m`` with ``fn.reductions.mean``. DALI has no ellipse-drawing op and the
   landmarks are data, so this split keeps the mask per sample without per-sample Python;
3. resize to ``cfg.resize`` (only when the stored frames have another size);
4. random crop ``cfg.crop`` + horizontal flip (``fn.crop_mirror_normalize``, uint8, no normalisation yet);
5. colour jitter ``fn.color_twist`` under a per-sample condition (always for the first family when
   ``jitter_always_first_family``); DALI's contrast pivots on mid-grey where the torch path uses the image mean;
6. Gaussian blur with a per-sample sigma, conditional; 7. grayscale via ``fn.color_space_conversion``, conditional;
8. ImageNet normalisation to float CHW.

Outputs per sample: ``images`` (3, crop, crop) float and ``params`` = [crop_x, crop_y, flip, jitter, blur, gray,
mask, family] (crop_x/y: the crop's top-left pixel in the resized image) so landmarks can be mapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch

from pretrain.augment import MASK_REGIONS, AugmentConfig, ellipse_masks

FAMILIES = {"first": 0, "second": 1}
PARAM_NAMES = ("crop_x", "crop_y", "flip", "jitter", "blur", "gray", "mask", "family")

# One batch from the sampler: (jpegs, landmarks (N, 68, 2), families (N,) of 0 "first" / 1 "second").
FrameBatch = tuple[list[bytes], np.ndarray, np.ndarray]


class MaskedFeed:
    """Iterable for ``fn.external_source``: adds the per-sample landmark ellipse masks to each batch."""

    def __init__(self, source: Iterable[FrameBatch], cfg: AugmentConfig, image_size: int, seed: int):
        self.source, self.cfg, self.image_size = source, cfg, image_size
        # One generator for the whole run: each epoch draws fresh mask regions.
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], list[np.ndarray], np.ndarray]]:
        gen = self.generator
        size = self.image_size
        for jpegs, landmarks, families in self.source:
            n = len(jpegs)
            lm = torch.as_tensor(np.asarray(landmarks, dtype=np.float32)).reshape(n, 68, 2)
            coin = torch.rand(n, generator=gen) < self.cfg.mask_p
            region = torch.randint(0, len(MASK_REGIONS), (n,), generator=gen)
            masks = ellipse_masks(lm, region, size, size, self.cfg.mask_scale, self.cfg.mask_min_aspect)
            masks = (masks & coin[:, None, None]).to(torch.uint8)[..., None].numpy()  # (N, H, W, 1)
            raw = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
            yield raw, list(masks), np.asarray(families, dtype=np.int32).reshape(n)


def build_dali_pipeline(
    cfg: AugmentConfig,
    device: Literal["cpu", "gpu"],
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    source: Iterable[FrameBatch],
    image_size: int | None = None,
    prefetch_queue_depth: int = 2,
):
    """Define (not yet build) the DALI pipeline; ``device_id`` must be None on CPU. See the module docstring."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    cfg.validate()
    if device not in ("cpu", "gpu"):
        raise ValueError(f"build_dali_pipeline: device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and device_id is None:
        raise ValueError("build_dali_pipeline: device='gpu' needs a device_id (the local GPU index)")
    if device == "cpu" and device_id is not None:
        raise ValueError("build_dali_pipeline: device='cpu' needs device_id=None (DALI's CPU-only mode)")
    image_size = image_size or cfg.resize
    feed = MaskedFeed(source, cfg, image_size, seed)
    b, c, s, h = cfg.jitter
    mean = [255.0 * m for m in cfg.mean]
    std = [255.0 * v for v in cfg.std]

    @pipeline_def(enable_conditionals=True)
    def views():
        jpegs, mask, family = fn.external_source(
            source=feed, num_outputs=3, batch=True, cycle="raise", dtype=[types.UINT8, types.UINT8, types.INT32],
            layout=[None, "HWC", None],
        )  # fmt: skip
        images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        masked = fn.reductions.max(mask) > 0  # on the CPU: conditions and params stay host-side
        if device == "gpu":
            mask = mask.gpu()
        # Per-sample mean colour fills the ellipse; arithmetic broadcasts (H, W, 1) masks over (3,) means.
        maskf = fn.cast(mask, dtype=types.FLOAT)
        fill = fn.reductions.mean(images, axes=[0, 1])
        images = fn.cast(images * (1.0 - maskf) + fill * maskf, dtype=types.UINT8)
        if image_size != cfg.resize:
            images = fn.resize(images, resize_x=cfg.resize, resize_y=cfg.resize, antialias=True)

        crop_x = fn.random.uniform(range=[0.0, 1.0])
        crop_y = fn.random.uniform(range=[0.0, 1.0])
        flip = fn.random.coin_flip(probability=cfg.flip_p)
        images = fn.crop_mirror_normalize(
            images, crop=(cfg.crop, cfg.crop), crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=flip,
            dtype=types.UINT8, output_layout="HWC",
        )  # fmt: skip

        coin = fn.random.coin_flip(probability=cfg.jitter_p, dtype=types.BOOL)
        if cfg.jitter_always_first_family:
            jitter = coin | (family == FAMILIES["first"])
        else:
            jitter = coin
        if jitter:
            images = fn.color_twist(
                images,
                brightness=fn.random.uniform(range=[max(0.0, 1 - b), 1 + b]),
                contrast=fn.random.uniform(range=[max(0.0, 1 - c), 1 + c]),
                saturation=fn.random.uniform(range=[max(0.0, 1 - s), 1 + s]),
                hue=fn.random.uniform(range=[-360.0 * h, 360.0 * h]),  # degrees; cfg is a fraction of a turn
            )
        blur = fn.random.coin_flip(probability=cfg.blur_p, dtype=types.BOOL)
        if blur:
            images = fn.gaussian_blur(images, sigma=fn.random.uniform(range=list(cfg.blur_sigma)))
        gray = fn.random.coin_flip(probability=cfg.gray_p, dtype=types.BOOL)
        if gray:
            grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
            images = fn.cat(grey, grey, grey, axis=2)
        images = fn.crop_mirror_normalize(images, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

        span = float(cfg.resize - cfg.crop)  # DALI's crop origin is round(crop_pos * span)
        origin_x, origin_y = dmath.floor(crop_x * span + 0.5), dmath.floor(crop_y * span + 0.5)
        flags = (origin_x, origin_y, flip, jitter, blur, gray, masked, family)  # order of PARAM_NAMES
        params = fn.stack(*[fn.cast(v, dtype=types.FLOAT) for v in flags])
        if device == "gpu":
            params = params.gpu()
        return images, params

    return views(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_dynamic=True,
    )


def dali_iterator(pipeline, output_map: tuple[str, str] = ("images", "params")):
    """Wrap a (defined) pipeline as a torch iterator: yields ``[{"images": Tensor, "params": Tensor}]``."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    pipeline.build()
    return DALIGenericIterator(
        pipeline, list(output_map), last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False, size=-1
    )
