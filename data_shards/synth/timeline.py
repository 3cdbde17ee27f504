"""How a clip unfolds in time: expression segments with smooth transitions, speech, blinks, pose, light."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_shards.labels import EXPRESSIONS
from data_shards.synth.config import SynthConfig
from data_shards.synth.expression import expression_target


@dataclass
class ClipTimeline:
    """Per-frame ground truth and nuisance factors, arrays of length T (frames)."""

    expression: np.ndarray  # (T,) int
    action_units: np.ndarray  # (T, K) in [0, 1]
    valence_arousal: np.ndarray  # (T, 2) in [-1, 1]
    speech: np.ndarray  # (T,) extra mouth opening from talking, not an expression
    blink: np.ndarray  # (T,) 0 open .. 1 closed
    gaze: np.ndarray  # (T, 2) iris offset in eye half-widths
    head_pose: np.ndarray  # (T, 3) yaw, pitch, roll in degrees
    light: np.ndarray  # (T, 2) angle offset (radians), strength multiplier

    def __len__(self) -> int:
        return len(self.expression)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def _smooth_wander(rng: np.random.Generator, t: np.ndarray, dims: int) -> np.ndarray:
    """Sum of slow random sinusoids in [-1, 1]: head motion and light drift without random-walk blowup."""
    freqs = rng.uniform(0.04, 0.35, size=(3, dims))
    phases = rng.uniform(0, 2 * np.pi, size=(3, dims))
    weights = rng.uniform(0.3, 1.0, size=(3, dims))
    waves = (
        weights[:, None, :] * np.sin(2 * np.pi * freqs[:, None, :] * t[None, :, None] + phases[:, None, :])
    ).sum(0)
    return waves / weights.sum(0)


def _segments(cfg: SynthConfig, rng: np.random.Generator) -> list[tuple[float, int, float]]:
    """(start second, class, intensity) per segment; consecutive classes differ so the clip visibly changes."""
    segments: list[tuple[float, int, float]] = []
    start, cls = 0.0, int(rng.integers(len(EXPRESSIONS)))
    while start < cfg.seconds:
        segments.append((start, cls, float(rng.uniform(*cfg.intensity))))
        start += float(rng.uniform(*cfg.segment_seconds))
        cls = (cls + int(rng.integers(1, len(EXPRESSIONS)))) % len(EXPRESSIONS)
    return segments


def make_timeline(cfg: SynthConfig, rng: np.random.Generator) -> ClipTimeline:
    n = cfg.frames_per_clip
    t = np.arange(n) / cfg.fps
    segments = _segments(cfg, rng)
    targets = [expression_target(cls, intensity, rng) for _, cls, intensity in segments]
    talking = rng.random(len(segments)) < 0.6
    starts = np.array([s for s, _, _ in segments])
    seg = np.searchsorted(starts, t, side="right") - 1

    expression = np.empty(n, dtype=np.int64)
    aus = np.empty((n, len(targets[0][0])))
    va = np.empty((n, 2))
    for i, k in enumerate(seg):
        au_now, va_now = targets[k]
        blend = 1.0
        if k > 0 and cfg.transition_seconds > 0:
            blend = float(_smoothstep((t[i] - starts[k]) / cfg.transition_seconds))
        prev = max(k - 1, 0)
        aus[i] = targets[prev][0] + (au_now - targets[prev][0]) * blend
        va[i] = targets[prev][1] + (va_now - targets[prev][1]) * blend
        expression[i] = segments[k][1] if blend >= 0.5 else segments[prev][1]

    # Syllables at 3-5 Hz with a wandering phase and loudness; sampled at low fps this looks random, as it should.
    rate = rng.uniform(3, 5)
    phase = 2 * np.pi * rate * t + np.cumsum(rng.normal(0, 0.8, size=n))
    loudness = rng.uniform(0.4, 1.0, size=n)
    speech = cfg.speech * talking[seg] * loudness * (0.5 + 0.5 * np.sin(phase))
    blink = np.where(rng.random(n) < 0.07, rng.uniform(0.6, 1.0, size=n), 0.0)
    gaze = 0.35 * _smooth_wander(rng, t, 2) + rng.normal(0, 0.05, size=(n, 2))
    pose = np.asarray(cfg.pose_degrees) * (0.8 * _smooth_wander(rng, t, 3) + rng.normal(0, 0.08, size=(n, 3)))
    light = np.stack(
        [cfg.lighting_drift * _smooth_wander(rng, t, 1)[:, 0], 1 + 0.3 * _smooth_wander(rng, t, 1)[:, 0]], 1
    )
    return ClipTimeline(expression, aus, va, speech, blink, gaze, pose, light)


def still_timeline(cls: int, intensity: float = 1.0) -> ClipTimeline:
    """One frontal, silent frame of a class at a given intensity (contact sheets, tests)."""
    au, va = expression_target(cls, intensity)
    return ClipTimeline(
        expression=np.array([cls]),
        action_units=au[None],
        valence_arousal=va[None],
        speech=np.zeros(1),
        blink=np.zeros(1),
        gaze=np.zeros((1, 2)),
        head_pose=np.zeros((1, 3)),
        light=np.array([[0.0, 1.0]]),
    )
