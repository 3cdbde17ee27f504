"""DALI graphs: frame JPEGs + landmarks -> the paper's augmented views, on the CPU or the GPU.

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
4. random crop ``cfg.crop`` + horizontal flip (``fn.crop_mirror_normalize``), straight to float in 0..1 (DALI's
   CPU colour twist is ~2x faster on float than on uint8, and nothing is rounded to 8 bits between ops);
5. colour jitter and grayscale as ONE ``fn.color_twist`` on every sample, no conditional: a sample that skips
   jitter gets identity factors and grayscale is saturation 0 (the twist keeps luma, the grayscale formula);
   then a clamp to 0..1. Same YIQ saturation/hue as the torch path and the same hue direction (red towards
   yellow, as torchvision). DALI's contrast pivots on mid-grey where the torch path (like torchvision) uses the
   image's mean grey: the difference is a grey offset per sample, computed from the crop's mean colour
   (``fn.reductions.mean``) and folded into the clamp bounds and the normalisation mean, so both paths give
   the same contrast without another pass over the pixels;
6. Gaussian blur with a per-sample sigma, conditional (grayscale before blur here, after it in the torch
   path: both are linear, the order does not matter);
7. ImageNet normalisation to float CHW.

Outputs per sample: ``images`` (3, crop, crop) float and ``params`` = [crop_x, crop_y, flip, jitter, blur, gray,
mask, family] (crop_x/y: the crop's top-left pixel in the resized image) so landmarks can be mapped.

**In training (``data.pipeline=dali``): two DALI stages around a batched torch FaceSwap.** FaceSwap needs the
decoded pixels of every row of the batch (donors=batch: other rows; stream/bank: a donor set) and runs as batched torch ops on the device,
which DALI cannot call inside a graph without per-sample Python. So :class:`DaliStages` splits the work:

1. *decode stage* (:func:`build_decode_pipeline`): ``external_source`` of the batch's JPEG bytes (all 4B rows in
   ``[A, NA, P, NP]`` order) -> ``fn.decoders.image`` (``"mixed"`` = nvjpeg on the GPU, ``"cpu"`` here) ->
   ``fn.resize`` to ``data.image_size`` for frames stored at another size (``fn.peek_image_shape`` of the
   JPEG decides per sample; a same-size resize costs three times the decode); the output TensorList is
   copied into one torch uint8 (N, H, W, 3) device tensor with the PyTorch plugin's ``feed_ndarray`` (on the current CUDA stream on GPU)
   and made planar (N, 3, H, W) once, as the torch ops that follow want it;
2. *torch, on the device*: FaceSwap on the positive rows (P, NP) with donors from the donor set or the decoded batch,
   the mouth-eye descriptors from the unswapped frames, and the landmark-ellipse masks of every row (from the
   swapped landmarks for swapped rows), filled with each image's mean colour by planar uint8 arithmetic (DALI's
   CPU arithmetic ops took ~18 ms per 64-image batch for the same fill) - each one batched call seeded by
   ``(seed, epoch, rank, batch)``;
3. *augmentation stage* (:func:`build_dali_pipeline` with ``input="images"``): ``external_source`` fed with
   those device tensors (masked images and the drawn parameters per row) -> resize, crop/flip, jitter, blur,
   grayscale, normalisation as above, one DALI batch of 4B rows (the family input switches the jitter rule),
   copied back into a torch float (N, 3, crop, crop) device tensor.

Both stages are fed with ``feed_input`` and run synchronously (``prefetch_queue_depth=1``) by the thread that
finishes the batch: the training thread on CUDA; on the CPU each worker thread of
:class:`pretrain.pipelines.dali_pipeline.DaliBatchPipeline` finishes whole batches with its own pair of stages (one
DALI thread each; DALI pipelines are not thread-safe), so batches are built in parallel. A corrupt JPEG makes the
decode stage raise: the rows are then checked one by one with the CPU decoder, bad ones are replaced by the bytes
of another frame of the same clip (counted as ``corrupt_jpeg``) and the stage is run again - DALI pipelines keep
working after a failed run.

Randomness and resume: in training DALI draws nothing. Frame choice, FaceSwap coins/donors, and every view
parameter (mask coin and region, crop origin, flip, jitter coin and factors, blur coin and sigma, grayscale coin)
are drawn by torch from the batch's generator seeded by ``(seed, epoch, rank, batch)`` - with
:meth:`pretrain.augment.ViewAugmenter.draw_params`, the torch path's own draw - and fed to the augmentation stage
as per-sample ``external_source`` inputs (``FED_PARAMS``) that drive ``crop_mirror_normalize``, ``color_twist``,
``gaussian_blur`` and the conditionals. A batch's views therefore do not depend on thread timing or on what the
pipeline did before: a resumed run is bit-identical to the uninterrupted one, and the DALI and torch paths apply
the same parameters to the same batch with the same formulas (DALI clamps once after its twist, the torch
path after each jitter step: bright rows differ by a few grey levels). The standalone
``input="jpeg"`` mode (benchmarks) draws with DALI's own ``fn.random`` ops from the pipeline seed instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch

from pretrain.augment import LUMA, MASK_REGIONS, AugmentConfig, ViewParams, ellipse_masks

FAMILIES = {"first": 0, "second": 1}
PARAM_NAMES = ("crop_x", "crop_y", "flip", "jitter", "blur", "gray", "mask", "family")
# Per-sample float32 inputs of the augmentation stage (``input="images"``), drawn by torch:
FED_PARAMS = ("crop_x", "crop_y", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "blur", "sigma",
              "gray")  # fmt: skip

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
    input: Literal["jpeg", "images"] = "jpeg",
):
    """Define (not yet build) the DALI pipeline; ``device_id`` must be None on CPU. See the module docstring.

    ``input="jpeg"``: ``source`` yields :data:`FrameBatch` es and masks are drawn by :class:`MaskedFeed`.
    ``input="images"``: no ``source``; the caller feeds the named inputs ``images`` (uint8 HWC, on the
    pipeline's device, ellipse already filled) and the ``FED_PARAMS`` (float32 per sample) with
    ``feed_input`` before each ``run()`` (see :class:`DaliStages`).
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    cfg.validate()
    if device not in ("cpu", "gpu"):
        raise ValueError(f"build_dali_pipeline: device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and device_id is None:
        raise ValueError("build_dali_pipeline: device='gpu' needs a device_id (the local GPU index)")
    if device == "cpu" and device_id is not None:
        raise ValueError("build_dali_pipeline: device='cpu' needs device_id=None (DALI's CPU-only mode)")
    if input not in ("jpeg", "images"):
        raise ValueError(f"build_dali_pipeline: input must be 'jpeg' or 'images', got {input!r}")
    image_size = image_size or cfg.resize
    feed = MaskedFeed(source, cfg, image_size, seed) if input == "jpeg" else None
    fed = input == "images"  # random parameters fed per batch (exact resume) rather than drawn by DALI
    b, c, s, h = cfg.jitter

    @pipeline_def(enable_conditionals=True)
    def views():
        if feed is not None:
            jpegs, mask, family = fn.external_source(
                source=feed, num_outputs=3, batch=True, cycle="raise",
                dtype=[types.UINT8, types.UINT8, types.INT32], layout=[None, "HWC", None],
            )  # fmt: skip
            images = fn.decoders.image(
                jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB
            )
            masked = fn.reductions.max(mask) > 0  # on the CPU: conditions and params stay host-side
            if device == "gpu":
                mask = mask.gpu()
            # Per-sample mean colour fills the ellipse; arithmetic broadcasts (H, W, 1) masks over (3,) means.
            maskf = fn.cast(mask, dtype=types.FLOAT)
            fill = fn.reductions.mean(images, axes=[0, 1])
            images = fn.cast(images * (1.0 - maskf) + fill * maskf, dtype=types.UINT8)
        else:  # decoded, face-swapped and mask-filled frames from torch, already on the pipeline's device
            images = fn.external_source(name="images", device=device, dtype=types.UINT8, layout="HWC")
        if image_size != cfg.resize:
            images = fn.resize(images, resize_x=cfg.resize, resize_y=cfg.resize, antialias=True)

        span = float(cfg.resize - cfg.crop)  # DALI's crop origin is round(crop_pos * span)
        if fed:  # every random draw made by torch from the batch's seeded generator (see DaliStages.augment)
            drawn = {
                name: fn.external_source(name=name, device="cpu", dtype=types.FLOAT)
                for name in FED_PARAMS
            }  # fmt: skip
            crop_x, crop_y = drawn["crop_x"], drawn["crop_y"]
            flip = fn.cast(drawn["flip"], dtype=types.INT32)
        else:
            crop_x = fn.random.uniform(range=[0.0, 1.0])
            crop_y = fn.random.uniform(range=[0.0, 1.0])
            flip = fn.random.coin_flip(probability=cfg.flip_p)
        # To float in 0..1 right away: DALI's CPU colour twist is ~2x faster on float than on uint8, and the
        # later ops then work without rounding to 8 bits in between (as the torch path does).
        images = fn.crop_mirror_normalize(
            images, crop=(cfg.crop, cfg.crop), crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=flip,
            mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0], dtype=types.FLOAT, output_layout="HWC",
        )  # fmt: skip
        images_before_twist = images

        if fed:
            jitter = drawn["jitter"] > 0.5
            factors = {k: drawn[k] for k in ("brightness", "contrast", "saturation")}
            factors["hue"] = drawn["hue"] * 360.0  # degrees; torch draws a fraction of a turn
        else:
            coin = fn.random.coin_flip(probability=cfg.jitter_p, dtype=types.BOOL)
            jitter = coin | (family == FAMILIES["first"]) if cfg.jitter_always_first_family else coin
            factors = {
                "brightness": fn.random.uniform(range=[max(0.0, 1 - b), 1 + b]),
                "contrast": fn.random.uniform(range=[max(0.0, 1 - c), 1 + c]),
                "saturation": fn.random.uniform(range=[max(0.0, 1 - s), 1 + s]),
                "hue": fn.random.uniform(
                    range=[-360.0 * h, 360.0 * h]
                ),  # degrees; cfg is a fraction of a turn
            }
        gray = drawn["gray"] > 0.5 if fed else fn.random.coin_flip(probability=cfg.gray_p, dtype=types.BOOL)
        # Jitter and grayscale as ONE colour twist on every sample (no conditional split/merge): a sample that
        # skips jitter gets the identity factors, and grayscale is saturation 0 (the twist keeps luma
        # Y = 0.299 R + 0.587 G + 0.114 B, the grayscale formula). Grayscale is applied before the blur here
        # and after it in the torch path; both are linear, so the order does not change the result.
        on = fn.cast(jitter, dtype=types.FLOAT)
        keep_colour = 1.0 - fn.cast(gray, dtype=types.FLOAT)
        brightness = 1.0 + on * (factors["brightness"] - 1.0)
        contrast = 1.0 + on * (factors["contrast"] - 1.0)
        images = fn.color_twist(
            images,
            brightness=brightness,
            contrast=contrast,
            saturation=(1.0 + on * (factors["saturation"] - 1.0)) * keep_colour,
            hue=on * factors["hue"],
            dtype=types.FLOAT,
        )
        # DALI's contrast pivots on mid-grey (0.5); the torch path pivots on the image's mean grey as torchvision
        # does. The two differ by a grey offset per sample, shift = b (1 - c) (mean luma - 0.5), which the
        # saturation/hue matrix, the blur and grayscale all leave as it is, so it is applied for free: in the
        # clamp bounds below and in the per-sample mean of the final normalisation (no extra pass over pixels).
        rgb_mean = fn.reductions.mean(images_before_twist, axes=[0, 1])
        if device == "gpu":  # three numbers per sample; op arguments live on the CPU (dynamic executor)
            rgb_mean = rgb_mean.cpu()
        luma_mean = fn.reductions.sum(rgb_mean * types.Constant(list(LUMA), dtype=types.FLOAT), axes=[0])
        shift = brightness * (1.0 - contrast) * (luma_mean - 0.5)
        # Back into 0..1 (in the torch path's terms), as the torch path does (saturation and hue push saturated
        # colours out of gamut); min(max()) costs about half of DALI's fused clamp op on the CPU.
        images = dmath.min(dmath.max(images, 0.0 - shift), 1.0 - shift)
        if fed:
            blur, sigma = drawn["blur"] > 0.5, drawn["sigma"]
        else:
            blur = fn.random.coin_flip(probability=cfg.blur_p, dtype=types.BOOL)
            sigma = fn.random.uniform(range=list(cfg.blur_sigma))
        if blur:
            images = fn.gaussian_blur(images, sigma=sigma, dtype=types.FLOAT)
        mean = types.Constant(list(cfg.mean), dtype=types.FLOAT) - shift  # (3,) per sample
        images = fn.crop_mirror_normalize(
            images, mean=mean, std=list(cfg.std), dtype=types.FLOAT, output_layout="CHW"
        )

        if fed:  # the caller drew the parameters and knows them: no params output (~10 small ops per sample)
            return images
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


def build_decode_pipeline(
    device: Literal["cpu", "gpu"], batch_size: int, num_threads: int, device_id: int | None, image_size: int,
    seed: int = 0,
):  # fmt: skip
    """The decode stage: named input ``jpegs`` -> RGB uint8 (image_size, image_size, 3) per sample."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def decode():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
        images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        # Frames are normally stored at image_size: resize only the others (read from the JPEG header without
        # decoding). A same-size resize is exact but not free: 3x the CPU decode time of a 128 px batch.
        shape = fn.peek_image_shape(jpegs)
        if (shape[0] != image_size) | (shape[1] != image_size):
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
        return images

    return decode(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
        prefetch_queue_depth=1, exec_dynamic=True,
    )  # fmt: skip


def to_torch(tensor_list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> a torch tensor on ``device`` via the PyTorch plugin."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(tuple(dense.shape()), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


class DaliStages:
    """Decode stage -> (caller's torch FaceSwap) -> augmentation stage; see the module docstring.

    ``device``: the torch device of the training step (cuda -> DALI ``gpu``/``mixed``, cpu -> DALI ``cpu``).
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        device: torch.device,
        rows: int,
        image_size: int,
        num_threads: int,
        seed: int,
    ):
        self.cfg, self.device, self.rows, self.image_size = cfg, torch.device(device), rows, image_size
        gpu = self.device.type == "cuda"
        self.dali_device: Literal["cpu", "gpu"] = "gpu" if gpu else "cpu"
        device_id = (self.device.index or 0) if gpu else None
        self.decoder = build_decode_pipeline(self.dali_device, rows, num_threads, device_id, image_size, seed)
        self.decoder.build()
        self.augmenter = build_dali_pipeline(
            cfg, self.dali_device, rows, num_threads, device_id, seed, None, image_size,
            prefetch_queue_depth=1, input="images",
        )  # fmt: skip
        self.augmenter.build()

    def decode(self, jpegs: list[bytes]) -> torch.Tensor:
        """JPEG bytes -> uint8 (N, 3, S, S) on the device; raises RuntimeError if any JPEG is corrupt."""
        self.decoder.feed_input("jpegs", [np.frombuffer(j, dtype=np.uint8) for j in jpegs])
        (images,) = self.decoder.run()
        # Planar (N, 3, S, S) memory: the torch ops that follow (FaceSwap, masks) run several times slower
        # on a channels-last view on the CPU than this one transposing copy costs.
        return to_torch(images, self.device, torch.uint8).permute(0, 3, 1, 2).contiguous()

    def augment(self, images: torch.Tensor, masks: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """uint8 (N, 3, S, S) device images, bool (N, S, S) masks and the drawn
        :class:`pretrain.augment.ViewParams` of every row -> float (N, 3, crop, crop).

        The ellipse is filled with the image's mean colour here, in torch on the device, where the mask was
        rasterised: the same fill as DALI arithmetic ops, at a tenth of their CPU cost. Crop, flip, jitter,
        blur and grayscale use ``params`` (drawn by torch from the batch's seeded generator, exactly as the
        torch path draws them), so a batch's views do not depend on the pipeline's history: resume is exact."""
        cfg = self.cfg
        span = max(1, cfg.resize - cfg.crop)
        b, c, s, h = params.jitter_factors.float().cpu().unbind(dim=1)
        fed = {
            "crop_x": params.offset[:, 0].float().cpu() / span,
            "crop_y": params.offset[:, 1].float().cpu() / span,
            "flip": params.flip, "jitter": params.jitter, "brightness": b, "contrast": c, "saturation": s,
            "hue": h, "blur": params.blur, "sigma": params.sigma, "gray": params.gray,
        }  # fmt: skip
        for name in FED_PARAMS:
            self.augmenter.feed_input(name, fed[name].to("cpu", torch.float32).contiguous().numpy())
        # The fill as planar uint8 arithmetic (vectorised; torch.where on uint8 is ~4x slower on the CPU),
        # then one copy into DALI's HWC layout.
        x = images.contiguous()
        n, channels, height, width = x.shape
        fill = (
            (x.view(n, channels, -1).sum(dim=2, dtype=torch.float32) / (height * width))
            .round()
            .to(torch.uint8)
        )
        inside = masks.to(device=x.device, dtype=torch.uint8)[:, None]
        x = x * (1 - inside) + fill[:, :, None, None] * inside
        hwc = x.permute(0, 2, 3, 1).contiguous()
        if self.dali_device == "cpu":
            hwc = hwc.cpu().numpy()
        self.augmenter.feed_input("images", hwc)  # one dense batch; torch CUDA tensors are fed zero-copy
        (views,) = self.augmenter.run()
        return to_torch(views, self.device, torch.float32)
