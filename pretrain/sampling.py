"""Frame choice inside one clip: SimCLR, TimeAug positives and HardNeg second anchors (Shu et al. 2022).

Positions returned are indices into the clip's stored frame list (sorted by frame index), whose rate is the
clip's ``fps``. Offsets are given in seconds and converted per clip: ``k = max(1, round(offset_s * fps))``
frames (at the reference 25/6 fps the default offsets are 2..6 frames). Every call draws afresh (no frozen
pairs): an offset by its weight, then an anchor uniformly among the positions where that offset fits in at
least one direction, then a direction uniformly among those that stay inside the clip.

HardNeg: a second anchor of the same clip at least ``hard_negative_min_s`` away from the anchor (12 frames at
25/6 fps), with its own TimeAug positive. Its positive avoids the anchor's positive frame (otherwise P and NP
would be one frame, a certain false negative): its offset is redrawn when needed, and in the rare case that
never works the collision is counted as ``hard_positive_collision``.

Short clips (``short_clip_policy``), counted by reason in :attr:`FrameSampler.counters`:
* ``offsets_truncated``: the clip is too short for some offsets; only offsets that fit are drawn (weights
  renormalised).
* ``single_frame``: one frame only; the positive is the anchor frame itself (two augmentations, as SimCLR).
* ``hard_negative_short``: the clip is shorter than the hard-negative distance; the two anchors go as far apart
  as the clip allows.
With ``clamp`` (default) the sample is kept as described; with ``skip`` :meth:`FrameSampler.sample_clip`
returns None for the last two reasons and the caller drops the clip (``offsets_truncated`` never skips).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from common.errors import ConfigError

REFERENCE_FPS = 25.0 / 6.0


def make_rng(seed: int, epoch: int, rank: int, worker: int) -> np.random.Generator:
    """Independent, reproducible stream for one (seed, epoch, rank, worker); all must be >= 0."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, rank, worker])))


@dataclass
class SamplingConfig:
    strategy: Literal["simclr", "timeaug"] = "timeaug"  # simclr: 2 views of a frame; timeaug: another frame
    hard_negatives: bool = True  # a second anchor + positive per clip (SSL-FER's 4B layout)
    positive_offsets_s: list[float] = field(  # TimeAug offsets (s), either direction: 2..6 frames at 25/6 fps
        default_factory=lambda: [0.48, 0.72, 0.96, 1.2, 1.44]
    )
    # weights 1..L over the L offsets: the paper's default c puts most weight on the nearest frames
    weight_mode: Literal["a", "b", "c"] = "c"  # offset weights: a uniform, b rising, c falling with distance
    hard_negative_min_s: float = 2.88  # least gap between the two anchors of a clip (12 frames at 25/6 fps)
    # see the module docstring for what each policy does with each kind of short clip
    short_clip_policy: Literal["clamp", "skip"] = "clamp"  # too short for offsets/hard negative: keep or drop

    def validate(self) -> None:

        if not self.positive_offsets_s or any(s <= 0 for s in self.positive_offsets_s):
            raise ConfigError(
                f"config key 'sampling.positive_offsets_s': positive seconds needed, got {self.positive_offsets_s}"
            )
        if self.hard_negative_min_s <= 0:
            raise ConfigError(
                f"config key 'sampling.hard_negative_min_s': must be > 0, got {self.hard_negative_min_s}"
            )


@dataclass(frozen=True)
class FrameChoice:
    anchor: int
    positive: int
    hard_anchor: int | None = None  # None without hard negatives
    hard_positive: int | None = None


def offset_weights(mode: str, count: int) -> np.ndarray:
    ranks = np.arange(1, count + 1, dtype=float)
    raw = {"a": np.ones(count), "b": ranks, "c": ranks[::-1]}[mode]
    return raw / raw.sum()


def offsets_in_frames(offsets_s: list[float], fps: float) -> np.ndarray:
    return np.maximum(1, np.rint(np.asarray(offsets_s, dtype=float) * fps)).astype(int)


class FrameSampler:
    """Draws a :class:`FrameChoice` per clip and counts short-clip fallbacks by reason."""

    def __init__(self, cfg: SamplingConfig | None = None):
        self.cfg = cfg or SamplingConfig()
        self.cfg.validate()
        self.counters: Counter[str] = Counter()

    def _fits(self, num_frames: int, offset: int) -> np.ndarray:
        """Positions from which ``offset`` stays inside the clip in at least one direction."""
        pos = np.arange(num_frames)
        return (pos + offset < num_frames) | (pos - offset >= 0)

    def _draw_offset(
        self, num_frames: int, fps: float, rng: np.random.Generator, count: bool = True
    ) -> int | None:
        offsets = offsets_in_frames(self.cfg.positive_offsets_s, fps)
        weights = offset_weights(self.cfg.weight_mode, len(offsets))
        ok = offsets < num_frames
        if not ok.any():
            return None
        if not ok.all():
            self.counters["offsets_truncated"] += int(count)
            weights = np.where(ok, weights, 0.0)
            weights = weights / weights.sum()
        return int(offsets[rng.choice(len(offsets), p=weights)])

    @staticmethod
    def _direction(position: int, offset: int, num_frames: int, rng, avoid: int | None = None) -> int:
        targets = [t for t in (position - offset, position + offset) if 0 <= t < num_frames]
        preferred = [t for t in targets if t != avoid] or targets
        return int(preferred[rng.integers(len(preferred))])

    def _positive(
        self, anchor: int, offset: int | None, num_frames: int, rng, avoid: int | None = None
    ) -> int:
        if self.cfg.strategy == "simclr" or offset is None:
            return anchor  # SimCLR (or a one-frame clip): two augmentations of the same frame
        return self._direction(anchor, offset, num_frames, rng, avoid)

    def _hard_anchor(self, anchor, positive, min_gap, num_frames, fps, rng) -> tuple[int, int | None]:
        """A second anchor >= min_gap from ``anchor``, and its offset (None for SimCLR)."""
        pos = np.arange(num_frames)
        far = np.abs(pos - anchor) >= min_gap
        if self.cfg.strategy != "timeaug":
            return int(rng.choice(pos[far])), None
        for _ in range(8):  # redraw the offset in the rare case its positive must hit the anchor's positive
            k = self._draw_offset(num_frames, fps, rng, count=False)
            ok = far & self._fits(num_frames, k)
            clear = ((pos - k >= 0) & (pos - k != positive)) | (
                (pos + k < num_frames) & (pos + k != positive)
            )
            if (ok & clear).any():
                return int(rng.choice(pos[ok & clear])), k
        self.counters["hard_positive_collision"] += 1
        return int(rng.choice(pos[ok])), k

    def sample_clip(self, num_frames: int, fps: float, rng: np.random.Generator) -> FrameChoice | None:
        """Frame positions for one clip of ``num_frames`` frames at ``fps``; None if the policy skips it."""
        cfg = self.cfg
        if num_frames < 1:
            raise ValueError("sample_clip: a clip needs at least one frame")
        skip = cfg.short_clip_policy == "skip"
        timeaug = cfg.strategy == "timeaug"
        if timeaug and num_frames == 1:
            self.counters["single_frame"] += 1
            if skip:
                return None
        min_gap = max(1, round(cfg.hard_negative_min_s * fps))
        hard_short = cfg.hard_negatives and num_frames <= min_gap
        if hard_short:
            self.counters["hard_negative_short"] += 1
            if skip:
                return None

        offset = self._draw_offset(num_frames, fps, rng) if timeaug else None
        allowed = self._fits(num_frames, offset) if offset is not None else np.ones(num_frames, bool)
        pos = np.arange(num_frames)
        if cfg.hard_negatives and not hard_short:
            # the anchor must leave room for a second anchor min_gap away
            allowed &= (pos >= min_gap) | (pos + min_gap < num_frames)
        anchor = int(rng.choice(pos[allowed]))
        positive = self._positive(anchor, offset, num_frames, rng)
        if not cfg.hard_negatives:
            return FrameChoice(anchor, positive)

        if hard_short:
            hard_offset = self._draw_offset(num_frames, fps, rng, count=False) if timeaug else None
            hard = 0 if anchor >= num_frames - 1 - anchor else num_frames - 1  # as far as the clip allows
        else:
            hard, hard_offset = self._hard_anchor(anchor, positive, min_gap, num_frames, fps, rng)
        hard_positive = self._positive(hard, hard_offset, num_frames, rng, avoid=positive)
        return FrameChoice(anchor, positive, hard, hard_positive)


def sample_clip(
    num_frames: int, fps: float, rng: np.random.Generator, cfg: SamplingConfig | None = None
) -> FrameChoice | None:
    """One-off :meth:`FrameSampler.sample_clip` (fallback counters are discarded)."""
    return FrameSampler(cfg).sample_clip(num_frames, fps, rng)
