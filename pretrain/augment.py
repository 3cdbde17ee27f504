"""The paper's per-view augmentations as batched tensor ops on any device (CPU in tests, CUDA in training).

One call augments a whole batch: every per-sample random parameter is drawn as a tensor from the caller's
``torch.Generator`` (so a batch is reproducible and independent of the device), then applied with batched ops:

1. landmark mask (p=0.8): an ellipse over one eye or the mouth, region drawn per sample, filled with the
   image's per-channel mean (the original code fixed the region for a whole run; we do not);
2. resize to ``resize`` (antialiased, skipped when the input already has that size), random ``crop`` and
   horizontal flip as one integer gather (exact pixels, no interpolation);
3. colour jitter: brightness, contrast around the image's mean grey (as torchvision), then saturation + hue as
   one 3x3 matrix per sample in YIQ space (the same model and hue direction as DALI's ``color_twist``, so both
   input paths agree; torchvision rotates hue in HSV instead), each only on the rows that drew it;
4. Gaussian blur with a per-sample sigma (grouped separable convolution, channels-last);
5. grayscale (ITU-R 601 luma, as torchvision);
6. ImageNet normalisation, optionally channels_last.

The DALI pipeline (``pretrain/pipelines/dali_graph.py``) reuses :func:`ellipse_masks` and the same configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)

# iBUG 68-point groups. "right"/"left" are the subject's, as in the iBUG convention.
RIGHT_EYE = tuple(range(36, 42))
LEFT_EYE = tuple(range(42, 48))
MOUTH = tuple(range(48, 68))
MASK_REGIONS = (RIGHT_EYE, LEFT_EYE, MOUTH)  # region ids 0, 1, 2

# RGB -> YIQ; its inverse is computed in float64 so a zero hue shift is the identity to float precision.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))

Family = Literal["first", "second"]


@dataclass
class AugmentConfig:
    resize: int = 128  # frames are resized to this before the random crop
    crop: int = 112  # random crop size fed to the model
    flip_p: float = 0.5  # horizontal flip probability
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.2)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # colour jitter probability (of the positives, see jitter_always_first_family)
    # The paper's code jitters the anchors (A, NA: family "first") always and the positives with jitter_p.
    jitter_always_first_family: bool = True  # A/NA are always jittered, as in the paper's first transform
    blur_p: float = 0.5  # Gaussian blur probability
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range (pixels)
    gray_p: float = 0.2  # grayscale probability
    mask_p: float = 0.8  # landmark mask probability: an ellipse over an eye or the mouth, mean-filled
    mask_scale: float = 1.6  # ellipse semi-axes = scale x half the extent of the region's landmarks
    mask_min_aspect: float = 0.6  # vertical semi-axis >= this x the horizontal one (eyes are thin)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation mean (ImageNet)
    std: tuple[float, float, float] = IMAGENET_STD  # normalisation std (ImageNet)
    channels_last: bool = False  # produce views in channels_last (must match model.channels_last)

    def validate(self) -> None:

        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"config key 'augment.{key}': {msg}")

        if self.crop <= 0 or self.resize < self.crop:
            fail("crop", f"must be in 1..resize ({self.resize}), got {self.crop}")
        for key in ("flip_p", "jitter_p", "blur_p", "gray_p", "mask_p"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                fail(key, f"a probability in [0, 1] is needed, got {value}")
        b, c, s, h = self.jitter
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            fail("jitter", f"need brightness/contrast/saturation >= 0 and hue in [0, 0.5], got {self.jitter}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            fail("blur_sigma", f"need 0 < low <= high, got {self.blur_sigma}")
        if self.mask_scale <= 0 or self.mask_min_aspect < 0:
            fail("mask_scale", "mask_scale must be > 0 and mask_min_aspect >= 0")
        if any(v <= 0 for v in self.std):
            fail("std", f"must be > 0, got {self.std}")


@dataclass
class ViewParams:
    """The random parameters one call used (all per sample, on the images' device)."""

    scale: tuple[float, float]  # (sx, sy) input pixels -> resized pixels
    offset: torch.Tensor  # (N, 2) long: crop origin (x, y) in the resized image
    flip: torch.Tensor  # (N,) bool
    mask: torch.Tensor  # (N,) bool
    mask_region: torch.Tensor  # (N,) long: 0 right eye, 1 left eye, 2 mouth
    jitter: torch.Tensor  # (N,) bool
    jitter_factors: torch.Tensor  # (N, 4): brightness, contrast, saturation, hue (fraction of a turn)
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,)
    gray: torch.Tensor  # (N,) bool
    crop: int

    @staticmethod
    def cat(parts: list[ViewParams]) -> ViewParams:
        """The rows of several draws (same scale and crop) as one."""
        fields = (
            "offset",
            "flip",
            "mask",
            "mask_region",
            "jitter",
            "jitter_factors",
            "blur",
            "sigma",
            "gray",
        )
        joined = {name: torch.cat([getattr(p, name) for p in parts]) for name in fields}
        return ViewParams(scale=parts[0].scale, crop=parts[0].crop, **joined)

    def map_landmarks(self, landmarks: torch.Tensor) -> torch.Tensor:
        """Landmarks in input pixel coords (N, K, 2) -> pixel coords of the output crop."""
        sx, sy = self.scale
        pts = landmarks.to(self.offset.device, torch.float32)
        # Pixel centres sit at integer coords: (x + 0.5) * s - 0.5 maps centres under a resize.
        x = (pts[..., 0] + 0.5) * sx - 0.5 - self.offset[:, None, 0]
        y = (pts[..., 1] + 0.5) * sy - 0.5 - self.offset[:, None, 1]
        x = torch.where(self.flip[:, None], self.crop - 1 - x, x)
        return torch.stack([x, y], dim=-1)


def ellipse_masks(
    landmarks: torch.Tensor, region: torch.Tensor, height: int, width: int, scale: float, min_aspect: float
) -> torch.Tensor:
    """Boolean (N, H, W) masks: an ellipse around landmark group ``MASK_REGIONS[region[n]]`` of sample n."""
    pts = landmarks.float()
    centres, semi_axes = [], []
    for idx in MASK_REGIONS:  # three fixed groups: a constant loop, not a per-sample one
        group = pts[:, list(idx)]
        lo, hi = group.amin(dim=1), group.amax(dim=1)
        centres.append((lo + hi) / 2)
        half = (hi - lo) / 2 * scale
        ax = half[:, 0].clamp_min(1.0)
        ay = torch.maximum(half[:, 1], ax * min_aspect).clamp_min(1.0)
        semi_axes.append(torch.stack([ax, ay], dim=-1))
    pick = region.to(pts.device).long()[:, None, None].expand(-1, 1, 2)
    centre = torch.stack(centres, dim=1).gather(1, pick)[:, 0]  # (N, 2)
    axes = torch.stack(semi_axes, dim=1).gather(1, pick)[:, 0]
    ys = torch.arange(height, device=pts.device, dtype=torch.float32)
    xs = torch.arange(width, device=pts.device, dtype=torch.float32)
    dx = (xs[None, None, :] - centre[:, 0, None, None]) / axes[:, 0, None, None]
    dy = (ys[None, :, None] - centre[:, 1, None, None]) / axes[:, 1, None, None]
    return dx * dx + dy * dy <= 1.0


def gaussian_kernels(sigma: torch.Tensor, radius: int, limit: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2*radius+1) normalised 1-D Gaussian kernels, one per sigma. With ``limit`` (N,), taps further out
    than ``limit[i]`` are zero: each sample keeps its own radius inside the common width."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (taps[None, :] / sigma.float()[:, None].clamp_min(1e-6)) ** 2)
    if limit is not None:
        k = k * (taps.abs()[None, :] <= limit.to(k.device, torch.float32)[:, None])
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur_per_sample(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur float (N, C, H, W) with a per-sample sigma: one grouped separable conv, reflect padding.

    The depthwise convolutions run in channels-last layout: on the CPU oneDNN's NHWC depthwise kernels are
    about 3x faster than its NCHW ones for these per-sample kernels (same result)."""
    n, c, h, w = images.shape
    radius = max(0, min(radius, h - 1, w - 1))  # reflect padding needs radius < size
    k = gaussian_kernels(sigma.to(images.device), radius).to(images.dtype)
    k = k.repeat_interleave(c, dim=0)  # (N*C, taps): the same kernel for the channels of one sample
    nhwc = torch.channels_last
    x = images.reshape(1, n * c, h, w)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect").contiguous(memory_format=nhwc)
    x = F.conv2d(x, k[:, None, None, :].contiguous(memory_format=nhwc), groups=n * c)
    x = F.conv2d(x, k[:, None, :, None].contiguous(memory_format=nhwc), groups=n * c)
    return x.contiguous().reshape(n, c, h, w)


def luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) grey levels."""
    w = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("nchw,c->nhw", images, w)[:, None]


def saturation_hue_matrices(saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) RGB matrices: scale chroma by ``saturation`` and rotate it by ``hue`` turns (YIQ space)."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64, device=saturation.device)
    from_yiq = torch.linalg.inv(to_yiq)
    angle = hue.double() * 2 * math.pi
    s = saturation.double()
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    n = saturation.shape[0]
    mid = torch.zeros(n, 3, 3, dtype=torch.float64, device=saturation.device)
    mid[:, 0, 0] = 1.0
    # Clockwise in the I-Q plane: a positive hue takes red towards yellow, as torchvision (HSV) and DALI do.
    mid[:, 1, 1], mid[:, 1, 2] = cos, sin
    mid[:, 2, 1], mid[:, 2, 2] = -sin, cos
    return (from_yiq @ mid @ to_yiq).float()


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device)


def _unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float 0..1; float input is taken as already in 0..1."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"ViewAugmenter: expected images (N, 3, H, W), got {tuple(images.shape)}")


def on_rows(x: torch.Tensor, selected: torch.Tensor, op, static: bool = False) -> torch.Tensor:
    """``op(rows, x[rows])`` written back into the selected rows of ``x`` (in place; ``x`` must be a tensor
    this module made). Only the chosen samples pay for an op, and no full-batch ``torch.where`` is needed.

    ``static``: every row is computed and ``selected`` picks per row, with no data-dependent shape - no host
    sync on a GPU (where the extra rows cost less than a stall of the stream); the same result."""
    if static:
        return torch.where(selected.view(-1, *[1] * (x.dim() - 1)), op(slice(None), x), x)
    if bool(selected.all()):
        return op(slice(None), x)
    rows = selected.nonzero()[:, 0]
    if rows.numel():
        x[rows] = op(rows, x[rows])
    return x


class ViewAugmenter:
    """Augment a batch of uint8 face images into float views; see the module docstring for the ops."""

    def __init__(self, cfg: AugmentConfig | None = None, static: bool = False):
        self.cfg = cfg or AugmentConfig()
        self.cfg.validate()
        self.static = static  # no host syncs (data-dependent shapes): the GPU setting, see on_rows
        self.blur_radius = math.ceil(3 * self.cfg.blur_sigma[1])

    def draw_params(
        self, n: int, family: Family, generator: torch.Generator, scale: tuple[float, float], device
    ) -> ViewParams:
        """Draw every random parameter for ``n`` samples on the generator's device, in a fixed order."""
        cfg, g = self.cfg, generator
        b, c, s, h = cfg.jitter
        u = torch.rand(
            5, n, generator=g, device=g.device
        )  # apply-or-not coins: mask, flip, jitter, blur, gray
        region = torch.randint(0, len(MASK_REGIONS), (n,), generator=g, device=g.device)
        offset = torch.randint(0, cfg.resize - cfg.crop + 1, (n, 2), generator=g, device=g.device)
        factors = torch.stack(
            [
                _uniform(n, max(0.0, 1 - b), 1 + b, g),
                _uniform(n, max(0.0, 1 - c), 1 + c, g),
                _uniform(n, max(0.0, 1 - s), 1 + s, g),
                _uniform(n, -h, h, g),
            ],
            dim=1,
        )
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], g)
        jitter_p = 1.0 if (family == "first" and cfg.jitter_always_first_family) else cfg.jitter_p
        return ViewParams(
            scale=scale,
            offset=offset.to(device),
            flip=(u[1] < cfg.flip_p).to(device),
            mask=(u[0] < cfg.mask_p).to(device),
            mask_region=region.to(device),
            jitter=(u[2] < jitter_p).to(device),
            jitter_factors=factors.to(device),
            blur=(u[3] < cfg.blur_p).to(device),
            sigma=sigma.to(device),
            gray=(u[4] < cfg.gray_p).to(device),
            crop=cfg.crop,
        )

    def __call__(
        self,
        images: torch.Tensor,
        landmarks: torch.Tensor,
        family: Family,
        generator: torch.Generator,
        return_params: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ViewParams]:
        _check_images(images)
        if family not in ("first", "second"):
            raise ValueError(f"ViewAugmenter: family must be 'first' or 'second', got {family!r}")
        n, _, height, width = images.shape
        scale = (self.cfg.resize / width, self.cfg.resize / height)
        p = self.draw_params(n, family, generator, scale, images.device)
        x = self.render(_unit_float(images), landmarks, p)
        return (x, p) if return_params else x

    def pair(
        self,
        anchors: torch.Tensor,
        anchor_landmarks: torch.Tensor,
        positives: torch.Tensor,
        positive_landmarks: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Family "first" on ``anchors`` and "second" on ``positives`` (same size), concatenated: the draws
        and values of two calls, in one pass over the pixels. Every pixel op is per row, so joining the
        rows halves the number of op launches, which is most of the cost for small batches on a CPU."""
        _check_images(anchors)
        _check_images(positives)
        if anchors.shape[1:] != positives.shape[1:]:
            raise ValueError(f"ViewAugmenter.pair: {tuple(anchors.shape)} vs {tuple(positives.shape)}")
        height, width = anchors.shape[-2:]
        p = self.draw_pair_params(
            anchors.shape[0], positives.shape[0], generator, height, width, anchors.device
        )
        x = torch.cat([_unit_float(anchors), _unit_float(positives)])
        landmarks = torch.cat([anchor_landmarks.to(x.device), positive_landmarks.to(x.device)])
        return self.render(x, landmarks, p)

    def draw_pair_params(
        self, anchors: int, positives: int, generator: torch.Generator, height: int, width: int, device
    ) -> ViewParams:
        """Family "first" for ``anchors`` rows, then "second" for ``positives`` rows of (height, width)
        images, in the order two calls draw them (every pipeline draws a batch's views this way)."""
        scale = (self.cfg.resize / width, self.cfg.resize / height)
        return ViewParams.cat(
            [self.draw_params(anchors, "first", generator, scale, device),
             self.draw_params(positives, "second", generator, scale, device)]
        )  # fmt: skip

    def render(self, x: torch.Tensor, landmarks: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """The pixel ops on float (N, 3, H, W) images in 0..1 with the drawn parameters ``p``."""
        cfg = self.cfg
        _, _, height, width = x.shape
        device = x.device

        # 1. landmark mask, at input resolution, filled with the per-sample mean colour.
        inside = ellipse_masks(
            landmarks.to(device), p.mask_region, height, width, cfg.mask_scale, cfg.mask_min_aspect
        )
        inside = (inside & p.mask[:, None, None])[:, None]
        x = torch.where(inside, x.mean(dim=(2, 3), keepdim=True), x)

        # 2. resize, then crop + flip as one gather of exact pixels.
        if (height, width) != (cfg.resize, cfg.resize):
            x = F.interpolate(x, size=(cfg.resize, cfg.resize), mode="bilinear", antialias=True)
        x = self._crop_flip(x, p)

        # 3. colour jitter, 4. blur, 5. grayscale: each on the rows that drew it.
        st = self.static
        x = on_rows(x, p.jitter, lambda rows, y: self._jitter(y, p.jitter_factors[rows]), st)
        x = on_rows(
            x, p.blur, lambda rows, y: gaussian_blur_per_sample(y, p.sigma[rows], self.blur_radius), st
        )
        x = on_rows(x, p.gray, lambda rows, y: luma(y).expand_as(y), st)
        # 6. normalise.
        mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _crop_flip(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        n, ch, size, _ = x.shape
        crop = self.cfg.crop
        steps = torch.arange(crop, device=x.device)
        xs = torch.where(p.flip[:, None], crop - 1 - steps[None], steps[None]) + p.offset[:, 0:1]
        ys = steps[None] + p.offset[:, 1:2]
        flat_index = (ys[:, :, None] * size + xs[:, None, :]).reshape(n, 1, crop * crop)
        out = x.reshape(n, ch, size * size).gather(2, flat_index.expand(n, ch, -1))
        return out.reshape(n, ch, crop, crop)

    @staticmethod
    def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        brightness, contrast, saturation, hue = factors.unbind(dim=1)
        x = (x * brightness[:, None, None, None]).clamp(0, 1)
        grey = luma(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - grey) * contrast[:, None, None, None] + grey).clamp(0, 1)
        m = saturation_hue_matrices(saturation, hue).to(x.dtype)
        x = torch.einsum("nij,njhw->nihw", m, x)
        return x.clamp(0, 1)
