"""Clips and evaluation frames: identity + timeline -> rendered frames with per-frame ground truth."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import ConfigError
from data_shards.synth.config import SynthConfig
from data_shards.synth.expression import AU_NAMES
from data_shards.synth.geometry import FaceGeometry, face_geometry
from data_shards.synth.identity import Identity, make_identity
from data_shards.synth.landmark_noise import DetectorNoise
from data_shards.synth.render import FaceRenderer
from data_shards.synth.timeline import ClipTimeline, make_timeline

SOURCE = "synth"
EVAL_SPLIT = "eval"  # neither train nor test: the evaluation splits SynthFace by identity itself


@dataclass
class ClipSample:
    key: str
    frames: list[np.ndarray]  # T x (size, size, 3) uint8 RGB
    meta: dict[str, Any]  # the `clips` json of docs/ARCHITECTURE.md


@dataclass
class FrameSample:
    key: str
    image: np.ndarray  # (size, size, 3) uint8 RGB
    meta: dict[str, Any]  # the `frames` json of docs/ARCHITECTURE.md


@dataclass
class SimulatedClip:
    """A clip's identity, timeline and geometry before (or without) rendering."""

    key: str
    identity: Identity
    timeline: ClipTimeline
    geometry: list[FaceGeometry]
    detector_seed: tuple[int, ...] = ()  # seeds the detector-like landmarks of this clip

    @property
    def landmarks(self) -> np.ndarray:
        """The generator's exact landmarks (T, 68, 2): evaluation labels only."""
        return np.stack([g.landmarks for g in self.geometry])

    def observed_landmarks(self, cfg: SynthConfig) -> np.ndarray:
        """The landmarks the shards carry: detector-like (default) or the exact ones (``landmarks=exact``)."""
        if cfg.landmarks == "exact":
            return self.landmarks
        return DetectorNoise.default().apply(self.landmarks, np.random.default_rng(self.detector_seed))


def clip_key(identity_index: int, clip_index: int) -> str:
    return f"synth-i{identity_index:07d}-c{clip_index:03d}"


def simulate_clip(cfg: SynthConfig, identity_index: int, clip_index: int) -> SimulatedClip:
    """Seeded from (seed, identity, clip) alone, so clips can be generated in any order by any worker."""
    ident = make_identity(cfg.seed, identity_index, cfg.zoom)
    rng = np.random.default_rng([cfg.seed, identity_index, clip_index, 0xC1])
    tl = make_timeline(cfg, rng)
    geometry = [
        face_geometry(
            ident,
            tl.action_units[i],
            speech=float(tl.speech[i]),
            blink=float(tl.blink[i]),
            gaze=tuple(tl.gaze[i]),
            pose=tuple(tl.head_pose[i]),
            size=cfg.size,
            expression_scale=cfg.expression_scale,
        )
        for i in range(len(tl))
    ]
    detector_seed = (cfg.seed, identity_index, clip_index, 0xD7)
    return SimulatedClip(clip_key(identity_index, clip_index), ident, tl, geometry, detector_seed)


def _round(values: np.ndarray, digits: int = 4) -> list:
    return np.round(values.astype(np.float64), digits).tolist()


def clip_meta(cfg: SynthConfig, sim: SimulatedClip) -> dict[str, Any]:
    tl = sim.timeline
    return {
        "clip_id": sim.key,
        "identity_id": sim.identity.identity_id,
        "fps": float(cfg.fps),
        "size": int(cfg.size),
        "source": SOURCE,
        "frame_indices": list(range(len(tl))),
        "landmarks": _round(sim.observed_landmarks(cfg), 2),
        "landmarks_source": cfg.landmarks,
        "landmarks_exact": _round(sim.landmarks, 2),  # evaluation label, never read by training
        "labels": {
            "expression": [int(v) for v in tl.expression],
            "valence": _round(tl.valence_arousal[:, 0]),
            "arousal": _round(tl.valence_arousal[:, 1]),
            "action_units": _round(tl.action_units, 3),
            "au_names": list(AU_NAMES),
            "head_pose": _round(tl.head_pose, 2),
        },
    }


def render_clip(cfg: SynthConfig, sim: SimulatedClip, frames: list[int] | None = None) -> list[np.ndarray]:
    renderer = FaceRenderer(sim.identity, cfg.size, cfg.supersample)
    indices = range(len(sim.geometry)) if frames is None else frames
    return [renderer.render(sim.geometry[i], tuple(sim.timeline.light[i])) for i in indices]


def generate_clip(cfg: SynthConfig, identity_index: int, clip_index: int) -> ClipSample:
    sim = simulate_clip(cfg, identity_index, clip_index)
    return ClipSample(sim.key, render_clip(cfg, sim), clip_meta(cfg, sim))


def clip_indices(cfg: SynthConfig) -> Iterator[tuple[int, int]]:
    for identity in range(cfg.identity_offset, cfg.identity_offset + cfg.identities):
        for clip in range(cfg.clips_per_identity):
            yield identity, clip


def iter_clips(cfg: SynthConfig) -> Iterator[ClipSample]:
    cfg.validate()
    for identity, clip in clip_indices(cfg):
        yield generate_clip(cfg, identity, clip)


def eval_frame_positions(n_frames: int, frames_per_clip: int) -> list[int]:
    """``frames_per_clip`` distinct frames spread evenly over the clip, away from its ends."""
    k = min(frames_per_clip, n_frames)
    positions = np.linspace(0, n_frames, k, endpoint=False) + n_frames / (2 * k)
    return sorted({min(int(p), n_frames - 1) for p in positions})


def iter_eval_frames(cfg: SynthConfig, frames_per_clip: int) -> Iterator[FrameSample]:
    cfg.validate()
    if frames_per_clip < 1:
        raise ConfigError(f"config key 'frames_per_clip': must be >= 1, got {frames_per_clip}")
    for identity, clip in clip_indices(cfg):
        sim = simulate_clip(cfg, identity, clip)
        positions = eval_frame_positions(len(sim.geometry), frames_per_clip)
        observed = sim.observed_landmarks(cfg)
        tl = sim.timeline
        for i, image in zip(positions, render_clip(cfg, sim, positions)):
            meta = {
                "identity_id": sim.identity.identity_id,
                "expression": int(tl.expression[i]),
                "valence": round(float(tl.valence_arousal[i, 0]), 4),
                "arousal": round(float(tl.valence_arousal[i, 1]), 4),
                "landmarks": _round(observed[i], 2),
                "landmarks_exact": _round(sim.geometry[i].landmarks, 2),
                "source": SOURCE,
                "clip_id": sim.key,
                "split": EVAL_SPLIT,
            }
            yield FrameSample(f"{sim.key}-f{i:04d}", image, meta)
