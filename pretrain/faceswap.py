"""Batched FaceSwap on device tensors: the positive's inner face (its expression) pasted onto another identity.

For each source image (a positive view) chosen with probability ``p``, a donor of another identity is picked
from a pool (by default the batch itself). Then, all samples at once:

1. similarity transform (Procrustes/Umeyama, no reflection) mapping the source's brow/eye/nose/mouth landmarks
   onto the donor's;
2. the source is warped into the donor frame (``grid_sample``, border padding);
3. mask = union of the convex hulls of eyes+brows and of nose+mouth, for the warped source landmarks and the
   donor landmarks (so none of the donor's own expression shows through). Hulls are found for the whole batch at
   once (one gift-wrap step from every point, kept where all points lie on the inner side of the edge) and
   rasterised as the intersection of their half-planes - only inside a box that holds every non-zero mask
   value - which also gives a signed distance used for a linear feather;
4. colour correction: warped source x blur(donor) / blur(warped source), Gaussian width ``blur_fraction`` x the
   donor's inter-ocular distance (kernel width as in the classic OpenCV recipe, sigma per sample); the blurs
   are banded matrix products, and by default (``color_stride`` 2) the smooth ratio is computed on a 2x2-pooled
   grid and upsampled bilinearly;
5. feathered blend onto the donor.

The output landmarks are the source landmarks mapped into the donor frame. :func:`face_swap_reference` is a
plain per-sample NumPy/SciPy version used only by the tests and the benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from pretrain.augment import gaussian_kernels

BROWS = tuple(range(17, 27))
NOSE = tuple(range(27, 36))
EYES = tuple(range(36, 48))
MOUTH = tuple(range(48, 68))
ALIGN_POINTS = BROWS + NOSE + EYES + MOUTH
HULL_GROUPS = (BROWS + EYES, NOSE + MOUTH)
RIGHT_EYE, LEFT_EYE = tuple(range(36, 42)), tuple(range(42, 48))


@dataclass
class FaceSwapConfig:
    """The ``faceswap.*`` section: the swap itself and how the training program schedules and feeds it."""

    p: float = 0.8  # probability that a positive's inner face is swapped onto a donor of another identity
    blur_fraction: float = 0.6  # colour-correction blur width / inter-ocular distance
    feather_fraction: float = 0.08  # width of the mask's soft edge / inter-ocular distance
    color_stride: Literal[1, 2] = 2  # colour-correction ratio on a grid this coarse, upsampled; 1: full-res
    enabled: bool = True  # FaceSwap on positives (P, NP) with probability faceswap.p
    # batch: every donor is then also a negative of the anchor, so the swapped positive shares its
    # hair/background/face shape with a negative; bank: frames read once when the pipeline starts, drawn per
    # batch (seeded), so donors are independent of the batch's negatives; stream (as the paper): a random frame
    # per clip of random shards over the whole dataset, the set replaced every donor_refresh_steps batches.
    donors: Literal["batch", "bank", "stream"] = "stream"  # batch rows, fixed bank, or refreshed stream
    donor_bank_frames: int = (
        256  # donor set size (donors=bank|stream); bank: one frame per clip, manifest order
    )
    donor_refresh_steps: int = 50  # donors=stream: a new donor set every this many batches (seeded by step)
    # A curriculum: FaceSwap from scratch can collapse training (docs/results/FINDINGS.md); learning from the
    # other strategies first and then ramping FaceSwap in trains (docs/results/ablation.md).
    start_step: int = 0  # no FaceSwap before this batch of the run; the p_warmup_steps ramp starts here
    p_warmup_steps: int = 0  # ramp faceswap.p linearly from 0 over this many batches (0: p from the start)

    def validate(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"config key 'faceswap.p': a probability in [0, 1] is needed, got {self.p}")
        if self.blur_fraction <= 0:
            raise ConfigError(f"config key 'faceswap.blur_fraction': must be > 0, got {self.blur_fraction}")
        if self.feather_fraction < 0:
            raise ConfigError(
                f"config key 'faceswap.feather_fraction': must be >= 0, got {self.feather_fraction}"
            )
        if self.p_warmup_steps < 0 or self.start_step < 0:
            raise ConfigError(
                "config keys 'faceswap.p_warmup_steps' and 'faceswap.start_step' must be >= 0, got "
                f"{self.p_warmup_steps} and {self.start_step}"
            )
        if self.donor_refresh_steps < 1:
            raise ConfigError(
                f"config key 'faceswap.donor_refresh_steps': need >= 1, got {self.donor_refresh_steps}"
            )
        if self.donor_bank_frames < 2:
            raise ConfigError(
                f"config key 'faceswap.donor_bank_frames': need >= 2 frames, got {self.donor_bank_frames}"
            )

    def probability_at(self, step: int) -> float:
        """FaceSwap probability of the ``step``-th batch of the run (0-based): 0 before ``start_step``, then ``p``
        ramped up linearly from 0 over ``p_warmup_steps``. A function of the batch position only, so a resumed
        run gets the same values."""
        if not self.enabled or step < self.start_step:
            return 0.0
        if self.p_warmup_steps <= 0:
            return self.p
        return self.p * min(1.0, (step - self.start_step) / self.p_warmup_steps)


@dataclass
class SwapResult:
    images: torch.Tensor  # (N, 3, H, W), the input dtype; unswapped rows are the untouched sources
    landmarks: torch.Tensor  # (N, 68, 2) landmarks of the output images
    swapped: torch.Tensor  # (N,) bool
    donor_index: torch.Tensor  # (N,) long index into the donor pool, -1 where not swapped


def inter_ocular(landmarks: torch.Tensor) -> torch.Tensor:
    """(N,) distance between the eye centres."""
    right = landmarks[:, list(RIGHT_EYE)].mean(dim=1)
    left = landmarks[:, list(LEFT_EYE)].mean(dim=1)
    return (left - right).norm(dim=-1)


def blur_kernel_sigma(iod: torch.Tensor, blur_fraction: float) -> torch.Tensor:
    """OpenCV's sigma for an odd kernel of width ~blur_fraction x iod (the classic faceswap recipe)."""
    k = torch.floor(blur_fraction * iod / 2) * 2 + 1
    return 0.3 * ((k - 1) * 0.5 - 1) + 0.8


def similarity_transforms(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Umeyama: (A (N,2,2), t (N,2)) minimising |A src + t - dst|^2 with A = s R, det R = +1."""
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    a, b = src - mu_s, dst - mu_d
    cov = b.transpose(1, 2) @ a / src.shape[1]  # (N, 2, 2)
    u, sv, vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u @ vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    sign = torch.stack([torch.ones_like(d), d], dim=1)
    rot = u @ torch.diag_embed(sign) @ vh
    var_s = (a * a).sum(dim=(1, 2)) / src.shape[1]
    scale = (sv * sign).sum(dim=1) / var_s.clamp_min(1e-12)
    mat = rot * scale[:, None, None]
    t = mu_d[:, 0] - (mat @ mu_s[:, 0, :, None])[..., 0]
    return mat.float(), t.float()


def apply_transform(points: torch.Tensor, mat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nij,nkj->nki", mat, points) + t[:, None]


def hull_edges(points: torch.Tensor, static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact convex hull edges of (N, K, 2) points as half-planes: unit outward normals (N, E, 2), offsets (N, E).

    Batched gift wrapping, one step for every point at once: from point i the candidate edge goes to the most
    clockwise other point, seen from i relative to the direction of the centroid (which lies inside the cone
    of the other points whenever i is a hull vertex). The candidate is a hull edge iff every point lies on its
    inner side (cross product >= 0): one (N, K, K) test, no per-sample hull algorithm. Rows with fewer than E
    edges are padded with never-binding half-planes (offset +inf). E is the largest edge count in the batch,
    or K with ``static`` (no host sync to read the count).
    """
    p = points.float()
    n, k = p.shape[:2]
    d = p[:, None, :, :] - p[:, :, None, :]  # d[n, i, j] = p_j - p_i
    length = d.norm(dim=-1)
    inward = p.mean(dim=1, keepdim=True) - p  # (N, K, 2)
    ccw = inward[:, :, None, 0] * d[..., 1] - inward[:, :, None, 1] * d[..., 0]
    along = (inward[:, :, None, :] * d).sum(dim=-1)
    angle = torch.atan2(ccw, along).masked_fill(length <= 1e-6, math.inf)  # itself and duplicates: never
    target = angle.argmin(dim=2, keepdim=True)  # (N, K, 1): the most clockwise other point
    edge = d.gather(2, target[..., None].expand(-1, -1, -1, 2))[:, :, 0]  # (N, K, 2)
    edge_length = length.gather(2, target)[..., 0]
    cross = edge[:, :, None, 0] * d[..., 1] - edge[:, :, None, 1] * d[..., 0]  # (N, K, K): point j vs edge i
    valid = (cross >= -1e-4 * edge_length[..., None]).all(dim=-1) & (edge_length > 1e-6)  # (N, K)
    earlier = torch.ones(k, k, dtype=torch.bool, device=p.device).tril(diagonal=-1)  # j < i
    valid &= ~((length <= 1e-6) & earlier).any(dim=-1)  # a repeated point starts no second copy of an edge
    count = k if static else int(valid.sum(dim=1).max())
    order = valid.float().argsort(dim=1, descending=True, stable=True)[:, :count]  # valid edges first
    edge = edge.gather(1, order[..., None].expand(-1, -1, 2))
    edge_length = edge_length.gather(1, order).clamp_min(1e-6)
    start = p.gather(1, order[..., None].expand(-1, -1, 2))
    normals = torch.stack([edge[..., 1], -edge[..., 0]], dim=-1) / edge_length[..., None]
    offsets = (normals * start).sum(dim=-1)
    offsets = torch.where(valid.gather(1, order), offsets, torch.full_like(offsets, math.inf))
    return normals, offsets


def _max_half_planes(normals: torch.Tensor, offsets: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor):
    """max over edges of ``n . (x, y) - o`` on per-sample pixel grids xs (N, 1, W), ys (N, H, 1) -> (N, H, W).

    Edges are taken in chunks of (N, chunk, H, W) broadcasts (a few million values): few ops, bounded memory."""
    shape = torch.broadcast_shapes(xs.shape, ys.shape)
    out = torch.full(shape, -math.inf, device=xs.device)
    chunk = max(1, (1 << 22) // max(1, math.prod(shape)))
    for e in range(0, normals.shape[1], chunk):
        nx, ny = normals[:, e : e + chunk, 0, None, None], normals[:, e : e + chunk, 1, None, None]
        d = xs[:, None] * nx + (ys[:, None] * ny - offsets[:, e : e + chunk, None, None])
        out = torch.maximum(out, d.amax(dim=1))
    return out


def hull_signed_distance(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W) signed distance to the convex hull of ``points`` (N, K, 2): max over its edges' half-planes.

    Exact inside (< 0); outside it is the distance to the nearest edge line, which is all a feather needs.
    """
    normals, offsets = hull_edges(points)
    n = points.shape[0]
    ys = torch.arange(height, device=points.device, dtype=torch.float32)[None, :, None].expand(n, -1, -1)
    xs = torch.arange(width, device=points.device, dtype=torch.float32)[None, None, :].expand(n, -1, -1)
    return _max_half_planes(normals, offsets, xs, ys)


def offset_hull_bounds(normals: torch.Tensor, offsets: torch.Tensor, grow: torch.Tensor) -> torch.Tensor:
    """(N, 2, 2) [[x_min, y_min], [x_max, y_max]] of the hull with every edge pushed out by ``grow`` (N,).

    That polygon is where the half-plane distance is < grow. Its corners are the feasible pairwise
    intersections of the shifted edge lines (no edge order needed; parallel pairs are skipped); a corner can
    lie well beyond ``grow`` from the hull where the hull is sharp, so a fixed margin would not be exact.
    """
    o = (offsets + grow[:, None]).double()
    nrm = normals.double()
    a, b = nrm[:, :, None], nrm[:, None, :]  # (N, E, 1, 2), (N, 1, E, 2)
    det = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]  # (N, E, E)
    oa, ob = o[:, :, None], o[:, None, :]
    safe = torch.where(det.abs() > 1e-9, det, torch.ones_like(det))
    corner = torch.stack(
        [(oa * b[..., 1] - ob * a[..., 1]) / safe, (a[..., 0] * ob - b[..., 0] * oa) / safe], -1
    )
    slack = torch.einsum("nijc,nec->nije", corner, nrm) - o[:, None, None, :]  # (N, E, E, E)
    tol = 1e-6 * (1 + corner.abs().amax(-1, keepdim=True))
    feasible = (det.abs() > 1e-9) & torch.isfinite(corner).all(-1) & (slack <= tol).all(-1)
    inf = torch.full_like(corner, math.inf)
    lo = torch.where(feasible[..., None], corner, inf).flatten(1, 2).amin(1)
    hi = torch.where(feasible[..., None], corner, -inf).flatten(1, 2).amax(1)
    return torch.stack([lo, hi], dim=1).float()


def face_masks(
    landmark_sets: list[torch.Tensor], height: int, width: int, feather: torch.Tensor, static: bool = False
) -> torch.Tensor:
    """(N, 1, H, W) soft union of the inner-face hulls of every landmark set in ``landmark_sets``.

    Per landmark group, the hulls of all sets and samples form one batch; each is rasterised only inside a box
    that holds all its non-zero mask values (one box size per group, a per-hull origin) and merged into the
    frame with ``scatter_reduce(amax)``: the values of a full-frame rasterisation on a fraction of the pixels,
    in a few dozen ops (their Python overhead, more than their arithmetic, limited two CPU threads). A
    degenerate hull (all points on one line or at one spot) paints nothing. ``static`` rasterises the full
    frame instead: no box size read back to the host (a GPU stream never stalls), the same values.
    """
    n = feather.shape[0]
    device = feather.device
    out = torch.zeros(n, height * width, device=device)
    sets = len(landmark_sets)
    feather_px = feather.clamp_min(1e-3).repeat(sets)
    limit = torch.tensor([width, height], device=device, dtype=torch.float32)
    for group in HULL_GROUPS:
        normals, offsets = hull_edges(torch.cat([pts[:, list(group)] for pts in landmark_sets]), static)
        if normals.shape[1] == 0:  # every point set at one spot
            continue
        if static:
            ys = torch.arange(height, device=device, dtype=torch.float32)[None, :, None].expand(
                n * sets, -1, -1
            )
            xs = torch.arange(width, device=device, dtype=torch.float32)[None, None, :].expand(
                n * sets, -1, -1
            )
            dist = _max_half_planes(normals, offsets, xs, ys)
            soft = (0.5 - dist / feather_px[:, None, None]).clamp(0, 1) * _has_area(normals, offsets)[
                :, None, None
            ]
            out = torch.maximum(out, soft.view(sets, n, height * width).amax(dim=0))
            continue
        bounds = offset_hull_bounds(normals, offsets, 0.5 * feather_px)  # mask > 0 only inside
        has_area = torch.isfinite(bounds).all(dim=2).all(dim=1)
        bounds = torch.where(has_area[:, None, None], bounds, torch.zeros_like(bounds))
        lo = bounds[:, 0].floor().clamp(min=0)
        hi = torch.minimum(bounds[:, 1].ceil() + 1, limit)
        box_w, box_h = (hi - lo).clamp_min(1).amax(dim=0).long().tolist()
        box_w, box_h = min(box_w, width), min(box_h, height)
        origin = torch.minimum(lo, limit - torch.tensor([box_w, box_h], device=device, dtype=torch.float32))
        xs = origin[:, 0, None, None] + torch.arange(box_w, device=device, dtype=torch.float32)[None, None]
        ys = origin[:, 1, None, None] + torch.arange(box_h, device=device, dtype=torch.float32)[None, :, None]
        dist = _max_half_planes(normals, offsets, xs, ys)
        soft = (0.5 - dist / feather_px[:, None, None]).clamp(0, 1) * has_area[:, None, None]
        index = (ys.long() * width + xs.long()).reshape(sets, n, -1).transpose(0, 1).reshape(n, -1)
        out.scatter_reduce_(1, index, soft.reshape(sets, n, -1).transpose(0, 1).reshape(n, -1), reduce="amax")
    return out.view(n, 1, height, width)


def _has_area(normals: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(N,) True where the hull's real edges (finite offsets) include two that are not parallel: a polygon
    with area, not a segment or a spot (which would otherwise bind nowhere and paint the whole frame)."""
    real = torch.isfinite(offsets)
    det = normals[:, :, None, 0] * normals[:, None, :, 1] - normals[:, :, None, 1] * normals[:, None, :, 0]
    return ((det.abs() > 1e-9) & real[:, :, None] & real[:, None, :]).flatten(1).any(dim=1)


def blur_matrices(sigma: torch.Tensor, size: int, radius: int, stride: int) -> torch.Tensor:
    """(N, size // stride, size): Gaussian blur along one axis (reflect padding, as ``F.pad(mode="reflect")``)
    followed by averaging ``stride`` neighbours, as one matrix per sample. Each sample's kernel reaches
    ``ceil(3 sigma)`` pixels, as the per-sample recipe; ``radius`` is the common width (at least the largest)."""
    radius = max(0, min(radius, size - 1))
    k = gaussian_kernels(sigma, radius, limit=torch.ceil(3 * sigma.float()))  # (N, taps)
    rows = torch.arange(size, device=sigma.device)[:, None] + torch.arange(
        -radius, radius + 1, device=sigma.device
    )
    rows = rows.abs()
    rows = torch.where(rows >= size, 2 * (size - 1) - rows, rows)  # (size, taps) source column of each tap
    mat = torch.zeros(sigma.shape[0], size, size, device=sigma.device)
    mat.scatter_add_(2, rows.expand(sigma.shape[0], -1, -1), k[:, None, :].expand(-1, size, -1).contiguous())
    return mat.view(sigma.shape[0], size // stride, stride, size).mean(dim=2)


def blur_pooled(images: torch.Tensor, mat_h: torch.Tensor, mat_w: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, C, H', W') through per-sample axis matrices from :func:`blur_matrices`.

    Two batched matrix products (the blur and the pooling folded into one banded matrix per axis): on a CPU
    several times faster than a grouped convolution, whose per-sample kernels defeat oneDNN.
    """
    n, c, h, w = images.shape
    x = torch.matmul(images.reshape(n, c * h, w), mat_w.transpose(1, 2)).view(n, c, h, mat_w.shape[1])
    return torch.matmul(mat_h[:, None], x)


def color_ratio(
    donor: torch.Tensor, warped: torch.Tensor, sigma: torch.Tensor, stride: int, static: bool = False
) -> torch.Tensor:
    """The classic colour correction factor blur(donor) / blur(warped source), (N, 3, H, W).

    ``stride`` 1 is the full-resolution recipe. With ``stride`` 2 both blurs are averaged over 2 x 2 blocks
    (folded into the blur matrices) and the smooth ratio is upsampled bilinearly: a quarter of the
    divisions and about half the matrix work, for a result within a few tenths of a grey level of the
    full-resolution recipe inside the mask on face images (measured in tests/test_faceswap.py). ``static``
    sizes the blur matrices for the whole frame instead of the largest sigma (no host sync; the same values)."""
    _, _, h, w = donor.shape
    if stride > 1 and (h % stride or w % stride):
        stride = 1  # odd sizes: the exact recipe
    radius = max(h, w) - 1 if static else int(math.ceil(3 * float(sigma.max())))
    mat_w = blur_matrices(sigma, w, radius, stride)
    mat_h = mat_w if h == w else blur_matrices(sigma, h, radius, stride)
    blur_donor, blur_warped = blur_pooled(donor, mat_h, mat_w), blur_pooled(warped, mat_h, mat_w)
    # As in the classic recipe: avoid dividing by ~0 in dark areas.
    ratio = blur_donor / torch.where(blur_warped <= 1.0, blur_warped + 128.0, blur_warped)
    return upsample2(ratio) if stride == 2 else ratio


def draw_donors(
    identity: torch.Tensor,
    pool_identity: torch.Tensor,
    generator: torch.Generator,
    pool_allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N,) uniform random donor index in the pool with another identity (and ``pool_allowed``, (K,) bool,
    where given); -1 where none exists."""
    scores = torch.rand(
        identity.shape[0], pool_identity.shape[0], generator=generator, device=generator.device
    )
    scores = scores.to(identity.device)
    allowed = identity[:, None] != pool_identity[None, :].to(identity.device)
    if pool_allowed is not None:
        allowed &= pool_allowed[None, :].to(identity.device)
    scores = torch.where(allowed, scores, torch.full_like(scores, -1.0))
    best, index = scores.max(dim=1)
    return torch.where(best >= 0, index, torch.full_like(index, -1))


def face_swap(
    source: torch.Tensor,
    source_landmarks: torch.Tensor,
    donor: torch.Tensor,
    donor_landmarks: torch.Tensor,
    cfg: FaceSwapConfig,
    static: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste every source's inner face onto the paired donor. (N,3,H,W) in 0..255 -> float, landmarks.
    ``static``: no op with a data-dependent shape (no host sync on a GPU); the same result."""
    n, _, height, width = donor.shape
    # One plain float layout for all the pixel maths: decoded frames often arrive as channels-last views, and
    # element-wise ops that mix layouts run several times slower on the CPU.
    source = source.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    donor = donor.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    src_pts, dst_pts = source_landmarks.float(), donor_landmarks.float()
    mat, t = similarity_transforms(src_pts[:, list(ALIGN_POINTS)], dst_pts[:, list(ALIGN_POINTS)])
    out_landmarks = apply_transform(src_pts, mat, t)

    # Inverse map: donor pixel p -> source position A^-1 (p - t), as one affine map between grid_sample's
    # normalised coordinates (pixel x = (u + 1) W / 2 - 1/2 in both frames, align_corners=False).
    inv = torch.linalg.inv(mat)
    src_h, src_w = source.shape[-2:]
    to_pixels = torch.diag(torch.tensor([width / 2, height / 2], device=donor.device))
    to_unit = torch.diag(torch.tensor([2 / src_w, 2 / src_h], device=donor.device))
    out_centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], device=donor.device)
    src_centre = torch.tensor([(src_w - 1) / 2, (src_h - 1) / 2], device=donor.device)
    linear = to_unit @ inv @ to_pixels
    shift = ((inv @ (out_centre - t)[..., None])[..., 0] - src_centre) @ to_unit.T
    grid = F.affine_grid(
        torch.cat([linear, shift[..., None]], dim=2), [n, 3, height, width], align_corners=False
    )
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)

    iod = inter_ocular(dst_pts)
    mask = face_masks([out_landmarks, dst_pts], height, width, cfg.feather_fraction * iod, static)

    sigma = blur_kernel_sigma(iod, cfg.blur_fraction)
    corrected = (warped * color_ratio(donor, warped, sigma, cfg.color_stride, static)).clamp_(0, 255)
    return torch.lerp(donor, corrected, mask), out_landmarks


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling of (N, C, H, W), ``align_corners=False`` with edge clamping: what
    ``F.interpolate(x, scale_factor=2, mode="bilinear")`` computes, at half its CPU time (each output is
    3/4 of its own cell and 1/4 of the nearest neighbour cell)."""

    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        size = x.shape[dim]
        before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, size - 1)], dim)
        after = torch.cat([x.narrow(dim, 1, size - 1), x.narrow(dim, size - 1, 1)], dim)
        pair = torch.stack([torch.lerp(x, before, 0.25), torch.lerp(x, after, 0.25)], dim + 1)
        return pair.flatten(dim, dim + 1)

    return along(along(x, 3), 2)


class FaceSwap:
    """Randomly face-swap a batch of positives onto donors of another identity (see module docstring)."""

    def __init__(self, cfg: FaceSwapConfig | None = None, static: bool = False):
        self.cfg = cfg or FaceSwapConfig()
        self.cfg.validate()
        # static: every row is swapped and the coin picks per row - no host sync (the GPU setting)
        self.static = static

    def __call__(
        self,
        images: torch.Tensor,
        landmarks: torch.Tensor,
        identity: torch.Tensor,
        generator: torch.Generator,
        donor_images: torch.Tensor | None = None,
        donor_landmarks: torch.Tensor | None = None,
        donor_identity: torch.Tensor | None = None,
        donor_index: torch.Tensor | None = None,
        p: float | None = None,
        donor_allowed: torch.Tensor | None = None,
    ) -> SwapResult:
        """``images`` (N,3,H,W) uint8 or float 0..255 with ``landmarks`` (N,68,2) and integer ``identity`` (N,).

        The donor pool defaults to the batch itself. ``donor_index`` (N,) fixes the donors (-1: no swap);
        otherwise they are drawn with ``generator`` among pool entries of another identity. ``p`` overrides
        the configured probability for this call (a warm-up schedule); the draws are the same either way.
        ``donor_allowed`` (K,) bool restricts the pool further (donors=stream: no identity of the batch).
        """
        if donor_images is None:
            donor_images, donor_landmarks, donor_identity = images, landmarks, identity
        device = images.device
        n = images.shape[0]
        p = self.cfg.p if p is None else p
        coin = torch.rand(n, generator=generator, device=generator.device).to(device) < p
        if donor_index is None:
            donor_index = draw_donors(
                identity.to(device), donor_identity.to(device), generator, donor_allowed
            )
        donor_index = donor_index.to(device).long()
        swapped = coin & (donor_index >= 0)
        donor_index = torch.where(swapped, donor_index, torch.full_like(donor_index, -1))
        if self.static:
            pick = donor_index.clamp_min(0)  # rows without a donor compute a throw-away swap
            result, result_lm = face_swap(
                images, landmarks.to(device), donor_images[pick].to(device), donor_landmarks[pick].to(device),
                self.cfg, static=True,
            )  # fmt: skip
            if images.dtype == torch.uint8:
                result = result.add_(0.5).clamp_(0, 255).to(torch.uint8)
            keep = swapped[:, None, None, None]
            out_images = torch.where(keep, result.to(images.dtype), images)
            out_landmarks = torch.where(swapped[:, None, None], result_lm, landmarks.float())
            return SwapResult(out_images, out_landmarks, swapped, donor_index)
        out_images, out_landmarks = images.clone(), landmarks.clone().float()
        rows = swapped.nonzero()[:, 0]
        if rows.numel():  # swap only the chosen rows: a batched op on the subset
            pick = donor_index[rows]
            result, result_lm = face_swap(
                images[rows], landmarks[rows].to(device), donor_images[pick].to(device),
                donor_landmarks[pick].to(device), self.cfg,
            )  # fmt: skip
            if images.dtype == torch.uint8:
                result = result.add_(0.5).clamp_(0, 255).to(torch.uint8)  # round half up: values are >= 0
            out_images[rows] = result.to(images.dtype)
            out_landmarks[rows] = result_lm
        return SwapResult(out_images, out_landmarks, swapped, donor_index)


# ----------------------------------------------------------------------------------------------------------
# Per-sample NumPy/SciPy reference (tests and benchmark only): the classic OpenCV-style recipe, one face at a
# time, with exact convex hulls (scipy.spatial.ConvexHull) and scipy.ndimage warping/blurring.


def _umeyama_np(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sv, vh = np.linalg.svd(b.T @ a / len(src))
    sign = np.array([1.0, 1.0 if np.linalg.det(u @ vh) >= 0 else -1.0])
    rot = u @ np.diag(sign) @ vh
    scale = (sv * sign).sum() / (a * a).sum(1).mean()
    mat = scale * rot
    return mat, mu_d - mat @ mu_s


def _hull_distance_np(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Signed distance to the exact convex hull: < 0 inside (max over edge half-planes)."""
    from scipy.spatial import ConvexHull

    hull = points[ConvexHull(points).vertices]  # counter-clockwise
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    dist = np.full((height, width), -np.inf)
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        edge = b - a
        normal = np.array([edge[1], -edge[0]]) / np.linalg.norm(edge)  # outward for a CCW polygon
        dist = np.maximum(dist, (xs - a[0]) * normal[0] + (ys - a[1]) * normal[1])
    return dist


def face_swap_reference(
    source: np.ndarray,
    source_landmarks: np.ndarray,
    donor: np.ndarray,
    donor_landmarks: np.ndarray,
    cfg: FaceSwapConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One face: HxWx3 float arrays (0..255) -> (swapped image, its landmarks, soft mask)."""
    from scipy import ndimage

    height, width = donor.shape[:2]
    idx = list(ALIGN_POINTS)
    mat, t = _umeyama_np(source_landmarks[idx].astype(np.float64), donor_landmarks[idx].astype(np.float64))
    out_landmarks = source_landmarks @ mat.T + t
    inv = np.linalg.inv(mat)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    sx = inv[0, 0] * (xs - t[0]) + inv[0, 1] * (ys - t[1])
    sy = inv[1, 0] * (xs - t[0]) + inv[1, 1] * (ys - t[1])
    warped = np.stack(
        [ndimage.map_coordinates(source[..., c], [sy, sx], order=1, mode="nearest") for c in range(3)], -1
    )
    iod = np.linalg.norm(donor_landmarks[list(LEFT_EYE)].mean(0) - donor_landmarks[list(RIGHT_EYE)].mean(0))
    dist = np.full((height, width), np.inf)
    for pts in (out_landmarks, donor_landmarks):
        for group in HULL_GROUPS:
            dist = np.minimum(dist, _hull_distance_np(pts[list(group)], height, width))
    mask = np.clip(0.5 - dist / max(cfg.feather_fraction * iod, 1e-3), 0, 1)[..., None]
    k = math.floor(cfg.blur_fraction * iod / 2) * 2 + 1
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    radius = int(math.ceil(3 * sigma))

    def blur(img: np.ndarray) -> np.ndarray:
        # mode="mirror" is torch's "reflect"; truncate so the kernel radius is exactly `radius`.
        return np.stack(
            [
                ndimage.gaussian_filter(img[..., c], sigma, mode="mirror", truncate=radius / sigma)
                for c in range(3)
            ],
            -1,
        )

    blur_donor, blur_warped = blur(donor), blur(warped)
    blur_warped = blur_warped + 128.0 * (blur_warped <= 1.0)
    corrected = np.clip(warped * blur_donor / blur_warped, 0, 255)
    return donor * (1 - mask) + corrected * mask, out_landmarks, mask[..., 0]


# ----------------------------------------------------------------------------------------------------------
# Toy faces with iBUG-ordered landmarks, for tests and benchmarks when SynthFace is not available.


def _template_landmarks() -> np.ndarray:
    """A frontal 68-point face in a unit box (x, y in 0..1), iBUG order."""

    def arc(cx, cy, rx, ry, a0, a1, n):
        a = np.linspace(a0, a1, n)
        return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)

    jaw = arc(0.5, 0.45, 0.38, 0.45, math.pi, 0, 17)[:, [0, 1]] * [1, 1]
    jaw[:, 1] = 0.45 + np.abs(jaw[:, 1] - 0.45)  # lower half of the ellipse, left to right
    brow_r = arc(0.32, 0.36, 0.11, 0.05, math.pi, 2 * math.pi, 5)
    brow_l = arc(0.68, 0.36, 0.11, 0.05, math.pi, 2 * math.pi, 5)
    nose_bridge = np.stack([np.full(4, 0.5), np.linspace(0.4, 0.58, 4)], 1)
    nose_base = np.stack([np.linspace(0.43, 0.57, 5), 0.62 - 0.02 * np.cos(np.linspace(-1.2, 1.2, 5))], 1)
    eye_r = arc(0.33, 0.43, 0.06, 0.025, math.pi, 3 * math.pi, 7)[:6]
    eye_l = arc(0.67, 0.43, 0.06, 0.025, math.pi, 3 * math.pi, 7)[:6]
    mouth_out = arc(0.5, 0.74, 0.14, 0.06, math.pi, 3 * math.pi, 13)[:12]
    mouth_in = arc(0.5, 0.74, 0.09, 0.03, math.pi, 3 * math.pi, 9)[:8]
    pts = np.concatenate([jaw, brow_r, brow_l, nose_bridge, nose_base, eye_r, eye_l, mouth_out, mouth_in])
    assert pts.shape == (68, 2)
    return pts


def toy_faces(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (n,3,size,size), landmarks (n,68,2)): random skin/background/feature colours, pose and mouth."""
    g = generator
    tmpl = torch.tensor(_template_landmarks(), dtype=torch.float32)
    r = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    pts = tmpl[None].repeat(n, 1, 1)
    open_mouth = 1 + 1.5 * r(n)  # expression: mouth opening
    mouth = pts[:, 48:68]
    pts[:, 48:68, 1] = 0.74 + (mouth[..., 1] - 0.74) * open_mouth[:, None]
    angle = (r(n) - 0.5) * 0.4
    scale = size * (0.75 + 0.15 * r(n))
    shift = size * (0.5 + (r(n, 2) - 0.5) * 0.1)
    rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1).view(
        n, 2, 2
    )
    pts = torch.einsum("nij,nkj->nki", rot, pts - 0.5) * scale[:, None, None] + shift[:, None]
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    img = (r(n, 3, 1, 1) * 255).expand(n, 3, size, size).clone()

    def paint(group, colour, grow=1.0):
        dist = hull_signed_distance(pts[:, list(group)], size, size)
        inside = (dist <= grow)[:, None]
        return torch.where(inside, colour, img)

    skin = (torch.tensor([200.0, 150.0, 120.0]) * (0.5 + 0.6 * r(n, 1))).clamp(0, 255)[..., None, None]
    img = paint(range(0, 27), skin, grow=2.0)
    img = paint(range(27, 36), (skin * 0.8), grow=1.5)
    for eye in (RIGHT_EYE, LEFT_EYE):
        img = paint(eye, torch.full((n, 3, 1, 1), 250.0))
        centre = pts[:, list(eye)].mean(1)
        pupil = ((xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2) < (
            size / 60
        ) ** 2
        img = torch.where(pupil[:, None], (r(n, 3, 1, 1) * 120), img)
    img = paint(BROWS[:5], skin * 0.3)
    img = paint(BROWS[5:], skin * 0.3)
    img = paint(range(48, 60), torch.tensor([170.0, 40.0, 50.0]).view(1, 3, 1, 1).expand(n, 3, 1, 1))
    img = paint(range(60, 68), torch.full((n, 3, 1, 1), 30.0))
    img = img + (r(n, 1, size, size) - 0.5) * 10  # a little texture
    return img.round().clamp(0, 255).to(torch.uint8), pts
