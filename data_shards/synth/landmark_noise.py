"""Detector-like landmarks for SynthFace: the generator's exact points turned into what a detector reports.

Real users' landmarks come from a detector at ingest (dlib's 68-point predictor here, as in the paper). Giving
MaskFN, FaceSwap and the landmark mask the generator's exact points makes MaskFN's descriptor nearly an
expression label. SynthFace shards therefore carry detector-like landmarks, and keep the exact ones only as
evaluation labels (``labels.landmarks_exact``).

The model, fitted by ``bench/landmark_noise.py`` against dlib run on rendered SynthFace frames, works in a face
frame (origin between the eyes, x along the eye line, unit = the inter-ocular distance), on the 136 coordinates:

    detected = mean_detected + slope * (exact - mean_exact) + residual

``slope`` < 1 is the detector's pull towards its mean shape (it under-reports deformation: ~0.66 on average);
``residual`` is Gaussian with the detector's covariance across landmarks (low rank plus a floor) and an AR(1)
correlation from frame to frame (detector errors drift along a clip rather than jump). Both parts matter: on
held-out clips, an independent per-point noise of the same size leaves MaskFN's descriptor far better than
dlib leaves it; this model matches dlib (the bench prints both). A model rather than dlib itself: dlib finds
SynthFace's faces in only about half of the frames at 128 px, and costs ~8 ms per frame.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FITTED = Path(__file__).with_name("landmark_noise.json")
RANK = 24  # principal directions of the residual covariance kept; the rest is an isotropic floor


def face_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin (N, 2), rotation (N, 2, 2) whose columns are the face axes, scale (N,)) of each face."""
    right, left = points[:, 36:42].mean(1), points[:, 42:48].mean(1)
    axis = left - right
    scale = np.maximum(np.linalg.norm(axis, axis=1), 1e-6)
    x = axis / scale[:, None]
    y = np.stack([-x[:, 1], x[:, 0]], axis=1)
    return (right + left) / 2, np.stack([x, y], axis=2), scale


def to_face(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N, 68, 2) image points -> face-frame coordinates of ``reference``'s faces, flattened to (N, 136)."""
    origin, rotation, scale = face_frame(reference)
    face = np.einsum("nji,nkj->nki", rotation, points - origin[:, None]) / scale[:, None, None]
    return face.reshape(len(points), 136)


def from_face(face: np.ndarray, reference: np.ndarray) -> np.ndarray:
    origin, rotation, scale = face_frame(reference)
    face = face.reshape(len(face), 68, 2) * scale[:, None, None]
    return origin[:, None] + np.einsum("nij,nkj->nki", rotation, face)


@dataclass(frozen=True)
class DetectorNoise:
    mean_exact: np.ndarray  # (136,)
    mean_detected: np.ndarray  # (136,)
    slope: np.ndarray  # (136,)
    components: np.ndarray  # (RANK, 136): principal directions x their standard deviations
    floor: float  # std of the remaining residual, per coordinate
    correlation: float  # AR(1) coefficient of the residual from one frame to the next

    @classmethod
    def default(cls) -> DetectorNoise:
        """The model fitted on the current renderer (``python bench/landmark_noise.py --write``)."""
        return _load(str(FITTED))

    @classmethod
    def load(cls, path: str) -> DetectorNoise:
        data = json.loads(Path(path).read_text())
        return cls(
            np.asarray(data["mean_exact"]),
            np.asarray(data["mean_detected"]),
            np.asarray(data["slope"]),
            np.asarray(data["components"]),
            float(data["floor"]),
            float(data["correlation"]),
        )

    def save(self, path: Path = FITTED) -> None:
        data = {
            "mean_exact": np.round(self.mean_exact, 5).tolist(),
            "mean_detected": np.round(self.mean_detected, 5).tolist(),
            "slope": np.round(self.slope, 4).tolist(),
            "components": np.round(self.components, 5).tolist(),
            "floor": round(float(self.floor), 5),
            "correlation": round(float(self.correlation), 4),
        }
        path.write_text(json.dumps(data) + "\n")

    def apply(self, clip_points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Detector-like landmarks for the consecutive frames of one clip, (T, 68, 2) -> (T, 68, 2)."""
        points = np.asarray(clip_points, dtype=np.float64)
        exact = to_face(points, points)
        rho = float(np.clip(self.correlation, 0.0, 0.999))
        shocks = rng.standard_normal((len(points), len(self.components) + 136))
        latent = np.empty_like(shocks)
        latent[0] = shocks[0]
        for t in range(1, len(points)):
            latent[t] = rho * latent[t - 1] + np.sqrt(1.0 - rho * rho) * shocks[t]
        rank = len(self.components)
        residual = latent[:, :rank] @ self.components + self.floor * latent[:, rank:]
        detected = self.mean_detected + self.slope * (exact - self.mean_exact) + residual
        return from_face(detected, points)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> DetectorNoise:
    return DetectorNoise.load(path)


def fit_noise(
    exact: np.ndarray, detected: np.ndarray, clips: np.ndarray, frame_index: np.ndarray, stride: int = 1
) -> DetectorNoise:
    """Fit :class:`DetectorNoise` on frames where the detector found the face (both (N, 68, 2))."""
    x, y = to_face(exact, exact), to_face(detected, exact)
    mean_x, mean_y = x.mean(0), y.mean(0)
    dx = x - mean_x
    slope = (dx * (y - mean_y)).sum(0) / np.maximum((dx * dx).sum(0), 1e-12)
    residual = y - mean_y - slope * dx
    values, vectors = np.linalg.eigh(np.cov(residual.T))
    order = np.argsort(values)[::-1]
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
    components = (vectors[:, :RANK] * np.sqrt(values[:RANK])).T
    floor = float(np.sqrt(values[RANK:].mean()))
    pairs = [
        (a, a + 1)
        for a in range(len(clips) - 1)
        if clips[a] == clips[a + 1] and frame_index[a + 1] - frame_index[a] == stride
    ]
    correlation = 0.0
    if pairs:
        first, second = residual[[a for a, _ in pairs]].ravel(), residual[[b for _, b in pairs]].ravel()
        correlation = max(float(np.corrcoef(first, second)[0, 1]), 0.0) ** (1.0 / stride)
    return DetectorNoise(mean_x, mean_y, slope, components, floor, correlation)
