"""SynthConfig: what to generate, and the identity ranges that keep pretraining and evaluation people apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError

# Evaluation identities start here; pretraining identities are 0..N-1. Disjoint by construction for any
# realistic N (a million pretraining identities would be needed to collide).
EVAL_IDENTITY_OFFSET = 1_000_000
SPLITS = ("pretrain", "eval")


def identity_range(split: str, n: int) -> range:
    """Identity indices for ``split``: pretrain -> 0..n-1, eval -> 1_000_000..1_000_000+n-1."""
    if split not in SPLITS:
        raise ConfigError(f"config key 'split': must be one of {list(SPLITS)}, got {split!r}")
    if split == "pretrain" and n > EVAL_IDENTITY_OFFSET:
        raise ConfigError(f"config key 'identities': at most {EVAL_IDENTITY_OFFSET} pretraining identities")
    start = 0 if split == "pretrain" else EVAL_IDENTITY_OFFSET
    return range(start, start + n)


@dataclass
class SynthConfig:
    identities: int = 8
    clips_per_identity: int = 2
    seconds: float = 10.0
    seed: int = 0
    fps: float = 25 / 6
    size: int = 128
    identity_offset: int = 0  # first identity index (EVAL_IDENTITY_OFFSET for evaluation sets)
    segment_seconds: tuple[float, float] = (2.0, 5.0)  # how long one expression is held
    transition_seconds: float = 1.0  # blend time between two expressions (AU vectors interpolated)
    intensity: tuple[float, float] = (0.5, 1.0)  # expression intensity drawn per segment
    # Expression visibility (bench/expression_ceiling.py, 3 seeds): at 1.0 / 1.0 (the first corpus) a supervised
    # ResNet-18 (width 16) reads expression at 64 px at 27-30% macro-F1 on held-out people; at the defaults 65-70%.
    expression_scale: float = 2.0  # gain from AU intensity to face deformation (AU labels unchanged)
    zoom: float = 1.25  # face size in the frame; 1.0: whole head and shoulders, face ~55% of the image width
    speech: float = 0.35  # amplitude of speech-like mouth opening (0 = silent)
    pose_degrees: tuple[float, float, float] = (10.0, 6.0, 5.0)  # yaw, pitch, roll jitter amplitude
    lighting_drift: float = 0.35  # radians the light direction wanders over a clip
    supersample: int = 2  # draw at size * supersample then box-filter down (antialiasing)
    # Landmarks the shards carry: detector (the exact points passed through a model of dlib's errors, as real
    # ingested data has; bench/landmark_noise.py) or exact (the generator's points: an oracle for MaskFN).
    # The exact points are kept either way as the evaluation label `landmarks_exact`.
    landmarks: Literal["detector", "exact"] = "detector"

    def validate(self) -> None:
        _check(self.identities >= 1, "identities", "must be >= 1", self.identities)
        _check(self.clips_per_identity >= 1, "clips_per_identity", "must be >= 1", self.clips_per_identity)
        _check(self.seconds > 0, "seconds", "must be > 0", self.seconds)
        _check(self.seed >= 0, "seed", "must be >= 0", self.seed)
        _check(self.fps > 0, "fps", "must be > 0", self.fps)
        _check(32 <= self.size <= 1024, "size", "must be in [32, 1024]", self.size)
        _check(self.identity_offset >= 0, "identity_offset", "must be >= 0", self.identity_offset)
        _check(
            self.identity_offset >= EVAL_IDENTITY_OFFSET
            or self.identity_offset + self.identities <= EVAL_IDENTITY_OFFSET,
            "identities",
            f"pretraining identities must stay below the evaluation range ({EVAL_IDENTITY_OFFSET})",
            self.identities,
        )
        lo, hi = self.segment_seconds
        _check(
            0 < lo <= hi, "segment_seconds", "must be [low, high] with 0 < low <= high", self.segment_seconds
        )
        _check(
            0 <= self.transition_seconds <= lo,
            "transition_seconds",
            "must be in [0, segment_seconds[0]]",
            self.transition_seconds,
        )
        lo, hi = self.intensity
        _check(0 <= lo <= hi <= 1, "intensity", "must be [low, high] within [0, 1]", self.intensity)
        _check(
            0.5 <= self.expression_scale <= 3,
            "expression_scale",
            "must be in [0.5, 3]",
            self.expression_scale,
        )
        _check(0.75 <= self.zoom <= 1.35, "zoom", "must be in [0.75, 1.35]", self.zoom)
        _check(0 <= self.speech <= 1, "speech", "must be in [0, 1]", self.speech)
        _check(
            len(self.pose_degrees) == 3 and all(0 <= d <= 20 for d in self.pose_degrees),
            "pose_degrees",
            "must be three angles in [0, 20] (yaw, pitch, roll)",
            self.pose_degrees,
        )
        _check(
            0 <= self.lighting_drift <= 3.2,
            "lighting_drift",
            "must be in [0, 3.2] radians",
            self.lighting_drift,
        )
        _check(self.supersample in (1, 2, 3, 4), "supersample", "must be 1, 2, 3 or 4", self.supersample)

    @property
    def frames_per_clip(self) -> int:
        return max(1, round(self.seconds * self.fps))


def _check(ok: bool, key: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {rule}, got {value!r}")
