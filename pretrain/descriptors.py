"""Mouth-eye descriptors for MaskFN: which negatives probably share the anchor's expression.

``landmarks`` (default, no weights needed): from iBUG 68-point landmarks (N, 68, 2)

1. similarity-align each face (Procrustes: scale, rotation, translation; no reflection) to a fixed mean
   shape, using the points that move little with expression (nose bridge and base, the four eye corners);
2. take the brow, eye and mouth points (17-26, 36-47, 48-67: 42 points), subtract the mean shape's points,
   so what is left is the deformation (expression, plus some face-shape identity);
3. centre the eye+brow region and the mouth region separately (a slightly shifted mouth is not another
   expression), flatten: D = 84.
Two faces with the same expression deform the same way, so their descriptors have a high cosine; the
descriptor is invariant to where the face sits in the image, its size and in-plane rotation.

``cnn``: a frozen torchvision ResNet-18 (user-supplied ``state_dict`` file; nothing is downloaded) on an
eye-region crop and a mouth crop cut with ``roi_align`` from the landmarks: D = 1024.

Which landmarks: descriptors are computed from the UN-augmented landmarks of the source frame (stored in the
shard). The descriptor is about the expression, which crop, resize, colour and blur do not change, and the
landmark method is similarity-invariant anyway. A horizontal flip mirrors one-sided expressions; use
:func:`transform_landmarks` to follow the augmentation exactly when that matters (e.g. the CNN descriptor
on augmented views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from common.errors import ConfigError, UserError

BROWS = list(range(17, 27))
EYES = list(range(36, 48))
MOUTH = list(range(48, 68))
EYE_REGION = BROWS + EYES
DESCRIPTOR_POINTS = EYE_REGION + MOUTH  # 42 points -> 84 numbers
# Points that move little with expression: the alignment uses only these.
RIGID_POINTS = list(range(27, 36)) + [36, 39, 42, 45]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DescriptorError(UserError, RuntimeError):
    """The descriptor cannot be built (e.g. the CNN weights file is missing)."""


@dataclass
class DescriptorConfig:
    kind: Literal["landmarks", "cnn"] = "landmarks"  # MaskFN mouth-eye descriptor: geometry or frozen CNN
    weights_path: str | None = None  # kind=cnn: a torchvision resnet18 state_dict, or a backbone.pt of a run
    crop_size: int = 64  # side of the eye and mouth crops fed to the CNN

    def validate(self) -> None:

        if self.kind == "cnn" and (not self.weights_path or not Path(self.weights_path).is_file()):
            raise ConfigError(
                f"config key 'descriptors.weights_path': kind=cnn needs a torchvision resnet18 state_dict file "
                "or a pretraining run's backbone.pt, "
                f"got {self.weights_path!r} (save one with torch.save(model.state_dict(), path), "
                "or use descriptors.kind=landmarks)"
            )
        if self.crop_size < 16:
            raise ConfigError(f"config key 'descriptors.crop_size': must be >= 16, got {self.crop_size}")


def _mean_shape() -> torch.Tensor:
    """A frontal 68-point template (x right, y down, inter-ocular ~0.4): a smooth, symmetric average face."""
    pts: list[tuple[float, float]] = []
    for k in range(17):  # jaw: temple -> chin -> temple
        t = k * math.pi / 16
        pts.append((-0.5 * math.cos(t), -0.1 + 0.62 * math.sin(t)))
    right_brow = [(-0.40 + 0.08 * k, -0.30 - 0.05 * math.sin(math.pi * k / 4)) for k in range(5)]
    pts += right_brow + [(-x, y) for x, y in reversed(right_brow)]
    pts += [(0.0, -0.2 + 0.1 * k) for k in range(4)]  # nose bridge
    pts += [(-0.1 + 0.05 * k, 0.17 + 0.02 * math.sin(math.pi * k / 4)) for k in range(5)]  # nose base
    right_eye = [
        (-0.3, -0.15),
        (-0.233, -0.185),
        (-0.167, -0.185),
        (-0.1, -0.15),
        (-0.167, -0.115),
        (-0.233, -0.115),
    ]
    pts += right_eye + [(-x, y) for x, y in (right_eye[3], right_eye[2], right_eye[1], right_eye[0])]
    pts += [(-right_eye[5][0], right_eye[5][1]), (-right_eye[4][0], right_eye[4][1])]
    outer_top = [(-0.2, 0.33), (-0.13, 0.3), (-0.05, 0.285), (0.0, 0.29)]
    outer_bottom = [(0.13, 0.38), (0.05, 0.4), (0.0, 0.405)]
    pts += outer_top + [(-x, y) for x, y in reversed(outer_top[:3])]
    pts += outer_bottom + [(-x, y) for x, y in reversed(outer_bottom[:2])]
    inner_top = [(-0.17, 0.33), (-0.05, 0.315), (0.0, 0.315)]
    pts += inner_top + [(0.05, 0.315), (0.17, 0.33), (0.05, 0.35), (0.0, 0.35), (-0.05, 0.35)]
    shape = torch.tensor(pts, dtype=torch.float32)
    assert shape.shape == (68, 2)
    return shape


MEAN_SHAPE = _mean_shape()

# iBUG index of each point's mirror image (left <-> right), for flips.
MIRROR = (
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30]
    + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65]
)


def similarity_align(
    points: torch.Tensor, target: torch.Tensor, use: list[int] | None = None
) -> torch.Tensor:
    """Map each (N, K, 2) shape by the similarity that best fits ``points[:, use]`` onto ``target[use]``."""
    use = use if use is not None else list(range(points.shape[1]))
    src, dst = points[:, use].double(), target[use].double().to(points.device)
    src_c, dst_c = src.mean(dim=1, keepdim=True), dst.mean(dim=0)
    x, y = (src - src_c).unbind(-1)
    u, v = (dst - dst_c).unbind(-1)
    norm = (x * x + y * y).sum(dim=1).clamp_min(1e-12)
    # As complex numbers: dst = c * src with c = a + ib minimising the squared error.
    a = (x * u + y * v).sum(dim=1) / norm
    b = (x * v - y * u).sum(dim=1) / norm
    p = points.double() - src_c
    px, py = p.unbind(-1)
    out = torch.stack([a[:, None] * px - b[:, None] * py, b[:, None] * px + a[:, None] * py], dim=-1)
    return (out + dst_c).to(points.dtype)


def landmark_descriptor(landmarks: torch.Tensor) -> torch.Tensor:
    """(N, 68, 2) landmarks (any pixel frame) -> (N, 84) mouth-eye deformation descriptors."""
    if landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be (N, 68, 2), got {tuple(landmarks.shape)}")
    mean = MEAN_SHAPE.to(landmarks.device)
    aligned = similarity_align(landmarks.float(), mean, RIGID_POINTS)
    deform = aligned - mean
    eyes = deform[:, EYE_REGION]
    mouth = deform[:, MOUTH]
    parts = [eyes - eyes.mean(dim=1, keepdim=True), mouth - mouth.mean(dim=1, keepdim=True)]
    return torch.cat(parts, dim=1).flatten(1)


def transform_landmarks(
    landmarks: torch.Tensor, crop_boxes: torch.Tensor, flips: torch.Tensor, out_size: int
) -> torch.Tensor:
    """Follow a crop-resize (boxes (N, 4) = x0, y0, x1, y1 in source pixels) and optional h-flip (N,) bool.

    Returns landmarks in the ``out_size`` x ``out_size`` output frame; flipped faces are re-indexed so that
    point i keeps its iBUG meaning (e.g. 36 stays the image-left eye's outer corner).
    """
    x0, y0, x1, y1 = crop_boxes.to(landmarks.dtype).unbind(-1)
    sx = out_size / (x1 - x0)
    sy = out_size / (y1 - y0)
    x = (landmarks[..., 0] - x0[:, None]) * sx[:, None]
    y = (landmarks[..., 1] - y0[:, None]) * sy[:, None]
    out = torch.stack([x, y], dim=-1)
    mirrored = torch.stack([out_size - x, y], dim=-1)[:, MIRROR]  # for every row: no host sync on a GPU
    return torch.where(flips.to(torch.bool)[:, None, None], mirrored, out)


def _region_boxes(landmarks: torch.Tensor, points: list[int], margin: float) -> torch.Tensor:
    """Square boxes (N, 4) around ``points`` with a relative margin."""
    pts = landmarks[:, points]
    lo, hi = pts.amin(dim=1), pts.amax(dim=1)
    centre = (lo + hi) / 2
    half = (hi - lo).amax(dim=1, keepdim=True) * (0.5 + margin)
    return torch.cat([centre - half, centre + half], dim=1)


class CNNDescriptor(nn.Module):
    """Frozen CNN features of the eye-region and mouth crops: (N, 3, H, W), (N, 68, 2) -> (N, 2 x features):
    1024 for a torchvision ResNet-18, 2 x the backbone's feature size for a pretraining run's ``backbone.pt``."""

    def __init__(self, weights_path: str | Path, crop_size: int = 64, margin: float = 0.25):
        super().__init__()
        from torchvision.models import resnet18

        path = Path(weights_path)
        if not path.is_file():
            raise DescriptorError(
                f"CNN descriptor weights '{path}' not found: set descriptors.weights_path to a torchvision "
                "resnet18 state_dict (nothing is downloaded), or use descriptors.kind=landmarks"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise DescriptorError(f"'{path}' is not a state_dict (a {type(state).__name__})")
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
        net: nn.Module | None = resnet18(weights=None)
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError:  # shapes differ: e.g. a narrower backbone.pt
            missing, unexpected = ["(shapes)"], []
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            net = _project_backbone(state)
        if net is None:
            raise DescriptorError(
                f"'{path}' is neither a torchvision resnet18 state_dict nor a backbone.pt of this project "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        net.fc = nn.Identity()
        self.net = net.eval().requires_grad_(False)
        self.crop_size, self.margin = crop_size, margin
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CNNDescriptor:
        super().train(mode)
        self.net.eval()  # frozen: BatchNorm statistics never change
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = (images.float() - self.mean) / self.std
        n = images.shape[0]
        index = torch.arange(n, device=images.device, dtype=images.dtype)[:, None]
        feats = []
        for points in (EYE_REGION, MOUTH):
            boxes = _region_boxes(landmarks.to(images.device, images.dtype), points, self.margin)
            crops = roi_align(images, torch.cat([index, boxes], dim=1), self.crop_size, aligned=True)
            feats.append(self.net(crops))
        return torch.cat(feats, dim=1)


def _project_backbone(state: dict[str, torch.Tensor]) -> nn.Module | None:
    """A ``backbone.pt`` written by pretraining (any arch/width of ``pretrain.model``), else None: e.g. a SimCLR
    face model, trained without expression labels, as the frozen descriptor network."""
    from pretrain.model import ResNetBackbone, infer_model_config

    try:
        cfg = infer_model_config(state)
        net = ResNetBackbone(cfg.arch, cfg.width)
        net.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError):
        return None
    return net


def build_descriptor(cfg: DescriptorConfig) -> nn.Module:
    """A module ``(images, landmarks) -> (N, D)``; the landmark kind ignores the images."""
    cfg.validate()
    if cfg.kind == "cnn":
        return CNNDescriptor(cfg.weights_path, cfg.crop_size)
    return LandmarkDescriptor()


class LandmarkDescriptor(nn.Module):
    def forward(self, images: torch.Tensor | None, landmarks: torch.Tensor) -> torch.Tensor:
        return landmark_descriptor(landmarks)
