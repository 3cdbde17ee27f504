"""Face detection, 68-point landmarks (dlib) and an eye-aligned square crop.

`FaceAligner.process(rgb)` finds the largest frontal face (HOG detector), fits the iBUG 68-point shape predictor,
then cuts a square crop rotated so the eye line is horizontal and scaled by the inter-ocular distance. The
landmarks come back in the crop's pixel coordinates, so they are computed once here, at shard-build time.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import ConfigError, UserError

# iBUG 68-point indices of the two eyes (image-left eye = subject's right eye).
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
MOUTH_LEFT, MOUTH_RIGHT = 48, 54
LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"


class FaceModelError(UserError, RuntimeError):
    """The landmark model file cannot be found or loaded."""


@dataclass
class FaceConfig:
    size: int = 128  # side of the stored square crop (px)
    # Crop side = face_scale * reference distance * (1 + 2 * margin), the reference being the inter-ocular
    # distance (floored by eye-to-mouth, see face_scale_reference): 2.0 spans the face, margin adds context.
    margin: float = 0.35
    face_scale: float = 2.0
    # The crop centre sits this many reference distances below the eye midpoint (the face centre).
    centre_below_eyes: float = 0.6
    detect_max_side: int = 640  # images are shrunk to this for the HOG detector only (speed; huge faces)
    upsample: int = 0  # HOG upsampling passes: 1 finds faces down to ~40 px, at ~4x the cost
    landmarks_path: str = ""  # empty: the file shipped by face-recognition-models

    def validate(self) -> None:

        if self.size < 16:
            raise ConfigError(f"config key 'size': must be >= 16, got {self.size}")
        if self.margin < 0:
            raise ConfigError(f"config key 'margin': must be >= 0, got {self.margin}")
        if self.face_scale <= 0:
            raise ConfigError(f"config key 'face_scale': must be > 0, got {self.face_scale}")
        if self.detect_max_side < 64:
            raise ConfigError(f"config key 'detect_max_side': must be >= 64, got {self.detect_max_side}")
        if self.upsample not in (0, 1, 2):
            raise ConfigError(f"config key 'upsample': must be 0, 1 or 2, got {self.upsample}")


@dataclass
class AlignedFace:
    crop: np.ndarray  # uint8 (size, size, 3) RGB
    landmarks: np.ndarray  # float32 (68, 2): x, y in crop pixels
    source_landmarks: np.ndarray  # float32 (68, 2): x, y in the input image
    box: tuple[int, int, int, int]  # detector box in the input image: left, top, right, bottom
    num_faces: int  # faces the detector found (the largest was used)


def default_landmarks_path() -> Path:
    """The 68-point model inside face-recognition-models, found without importing the package.

    Importing it fails with setuptools >= 81 (pkg_resources), so the folder is located through its spec.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError(
            "face-recognition-models is not installed: pip install face-recognition-models==0.3.0 "
            "(or pass landmarks_path to a shape_predictor_68_face_landmarks.dat)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models" / LANDMARKS_FILE


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the six points of each eye: (image-left eye, image-right eye)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    return pts[LEFT_EYE].mean(axis=0), pts[RIGHT_EYE].mean(axis=0)


@dataclass
class CropTransform:
    """Similarity map between input pixels and crop pixels (dlib/array convention: pixel i has centre i)."""

    centre: np.ndarray  # crop centre in input pixels
    angle: float  # eye-line angle in the input (radians)
    scale: float  # input pixels per crop pixel
    size: int

    def to_crop(self, pts: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        d = np.asarray(pts, dtype=np.float64) - self.centre
        # Rotate by -angle (undo the tilt), then scale into crop pixels.
        u = (c * d[:, 0] + s * d[:, 1]) / self.scale
        v = (-s * d[:, 0] + c * d[:, 1]) / self.scale
        half = (self.size - 1) / 2.0
        return np.stack([u + half, v + half], axis=1)

    def pil_affine(self) -> tuple[float, ...]:
        """Coefficients (a, b, c, d, e, f) mapping output to input for PIL's AFFINE transform.

        PIL samples output pixel u at continuous u + 0.5 and reads input at continuous coordinates, so both
        sides are shifted by half a pixel relative to the array convention used for landmarks.
        """
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.scale
        half = self.size / 2.0  # continuous centre of the output
        cx, cy = self.centre[0] + 0.5, self.centre[1] + 0.5
        a, b = k * c, -k * s
        d, e = k * s, k * c
        return (a, b, cx - a * half - b * half, d, e, cy - d * half - e * half)


def face_scale_reference(landmarks: np.ndarray) -> float:
    """Inter-ocular distance, floored by the eye-to-mouth distance.

    On a frontal face the two are about equal; a turned head shortens the eye line but not the eye-mouth
    distance, so the floor keeps yawed faces from overflowing the crop.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    left, right = eye_centres(pts)
    mouth = (pts[MOUTH_LEFT] + pts[MOUTH_RIGHT]) / 2.0
    return max(float(np.linalg.norm(right - left)), float(np.linalg.norm(mouth - (left + right) / 2.0)), 1.0)


def crop_transform(landmarks: np.ndarray, cfg: FaceConfig) -> CropTransform:
    left, right = eye_centres(landmarks)
    dx, dy = right - left
    ref = face_scale_reference(landmarks)
    angle = math.atan2(dy, dx)
    down = np.array([-math.sin(angle), math.cos(angle)])  # the face's "down" direction in the input
    centre = (left + right) / 2.0 + down * (cfg.centre_below_eyes * ref)
    side = cfg.face_scale * ref * (1.0 + 2.0 * cfg.margin)
    return CropTransform(centre=centre, angle=angle, scale=side / cfg.size, size=cfg.size)


def warp_crop(rgb: np.ndarray, tf: CropTransform) -> np.ndarray:
    img = Image.fromarray(rgb)
    out = img.transform(
        (tf.size, tf.size), Image.Transform.AFFINE, tf.pil_affine(), Image.Resampling.BILINEAR
    )
    return np.asarray(out)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 HxWx3 C-contiguous RGB, as dlib needs (grey, alpha and palette images are converted)."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB") if image.mode != "RGB" else image
        return np.ascontiguousarray(np.asarray(image))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3].astype(np.uint8, copy=False))


class FaceAligner:
    """Detector + 68-point predictor + aligner. Not thread-safe; build one per worker process."""

    def __init__(self, cfg: FaceConfig | None = None):
        import dlib  # local: keeps `import data_shards` free of the native library

        self.cfg = cfg or FaceConfig()
        path = Path(self.cfg.landmarks_path) if self.cfg.landmarks_path else default_landmarks_path()
        if not path.is_file():
            raise FaceModelError(
                f"landmark model not found: {path} (reinstall face-recognition-models==0.3.0)"
            )
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        try:
            self.predictor = dlib.shape_predictor(os.fspath(path))
        except RuntimeError as err:
            raise FaceModelError(f"cannot load landmark model {path}: {err}") from err

    def detect(self, rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (left, top, right, bottom) in input pixels, largest first."""
        h, w = rgb.shape[:2]
        shrink = min(1.0, self.cfg.detect_max_side / max(h, w))
        small = rgb
        if shrink < 1.0:
            size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
            small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        rects = self.detector(small, self.cfg.upsample)
        boxes = [
            (
                round(r.left() / shrink),
                round(r.top() / shrink),
                round(r.right() / shrink),
                round(r.bottom() / shrink),
            )
            for r in rects
        ]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)

    def landmarks(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """68 (x, y) points for the face in `box`, in input pixels."""
        shape = self.predictor(rgb, self._dlib.rectangle(*box))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def align(self, rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tf = crop_transform(landmarks, self.cfg)
        return warp_crop(rgb, tf), tf.to_crop(landmarks)

    def process(self, image: Image.Image | np.ndarray) -> AlignedFace | None:
        """Aligned crop of the largest face, or None when no face is found."""
        rgb = to_rgb_array(image)
        boxes = self.detect(rgb)
        if not boxes:
            return None
        pts = self.landmarks(rgb, boxes[0])
        crop, crop_pts = self.align(rgb, pts)
        return AlignedFace(
            crop=crop,
            landmarks=crop_pts.astype(np.float32),
            source_landmarks=pts.astype(np.float32),
            box=boxes[0],
            num_faces=len(boxes),
        )
