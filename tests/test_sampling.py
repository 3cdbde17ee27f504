"""TimeAug / HardNeg frame choice: offset frequencies, distances, short clips, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from common.configio import from_dict
from common.errors import ConfigError
from pretrain.sampling import (
    REFERENCE_FPS,
    FrameSampler,
    SamplingConfig,
    make_rng,
    offset_weights,
    offsets_in_frames,
)


def test_default_offsets_are_2_to_6_frames_at_reference_fps():
    assert offsets_in_frames(SamplingConfig().positive_offsets_s, REFERENCE_FPS).tolist() == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("mode", ["a", "b", "c"])
def test_offset_frequencies_follow_weight_mode(mode):
    sampler = FrameSampler(SamplingConfig(weight_mode=mode, hard_negatives=False))
    rng = make_rng(0, 0, 0, 0)
    draws = 20_000
    counts = Counter()
    for _ in range(draws):
        c = sampler.sample_clip(60, REFERENCE_FPS, rng)
        counts[abs(c.positive - c.anchor)] += 1
    expected = offset_weights(mode, 5) * draws
    observed = np.array([counts[k] for k in (2, 3, 4, 5, 6)])
    chi2 = float((((observed - expected) ** 2) / expected).sum())
    assert chi2 < 20.5, (observed, expected)  # p ~ 0.0004 for 4 degrees of freedom
    assert sum(counts.values()) == draws
    assert not sampler.counters


def test_both_directions_and_every_position_used():
    sampler = FrameSampler(SamplingConfig(hard_negatives=False))
    rng = make_rng(1, 0, 0, 0)
    signs, anchors = Counter(), set()
    for _ in range(3000):
        c = sampler.sample_clip(20, REFERENCE_FPS, rng)
        signs[np.sign(c.positive - c.anchor)] += 1
        anchors.add(c.anchor)
        assert 0 <= c.positive < 20
    assert signs[1] > 1000 and signs[-1] > 1000
    assert anchors == set(range(20))


def test_hard_negatives_respect_min_distance():
    sampler = FrameSampler(SamplingConfig())
    rng = make_rng(2, 0, 0, 0)
    for num_frames in (13, 14, 20, 100):
        for _ in range(500):
            c = sampler.sample_clip(num_frames, REFERENCE_FPS, rng)
            assert abs(c.hard_anchor - c.anchor) >= 12
            assert 2 <= abs(c.hard_positive - c.hard_anchor) <= 6
            assert 0 <= c.hard_positive < num_frames and 0 <= c.positive < num_frames
            assert c.hard_positive != c.positive
    assert not sampler.counters


def test_short_clip_clamp_is_counted():
    sampler = FrameSampler(SamplingConfig())
    rng = make_rng(3, 0, 0, 0)
    c = sampler.sample_clip(8, REFERENCE_FPS, rng)  # too short for a 12-frame gap
    assert {c.anchor, c.hard_anchor} == {0, 7} or abs(c.anchor - c.hard_anchor) == max(c.anchor, 7 - c.anchor)
    c = sampler.sample_clip(4, REFERENCE_FPS, rng)  # offsets 4..6 do not fit
    assert abs(c.positive - c.anchor) in (2, 3)
    c = sampler.sample_clip(1, REFERENCE_FPS, rng)
    assert c == (c.__class__(0, 0, 0, 0))
    assert sampler.counters == {"hard_negative_short": 3, "offsets_truncated": 1, "single_frame": 1}


def test_short_clip_skip_returns_none_and_counts():
    sampler = FrameSampler(SamplingConfig(short_clip_policy="skip"))
    rng = make_rng(4, 0, 0, 0)
    assert sampler.sample_clip(10, REFERENCE_FPS, rng) is None
    assert sampler.sample_clip(1, REFERENCE_FPS, rng) is None
    assert sampler.sample_clip(30, REFERENCE_FPS, rng) is not None
    assert sampler.counters == {"hard_negative_short": 1, "single_frame": 1}


def test_simclr_uses_same_frame():
    sampler = FrameSampler(SamplingConfig(strategy="simclr", hard_negatives=False))
    c = sampler.sample_clip(10, 25.0, make_rng(5, 0, 0, 0))
    assert c.positive == c.anchor and c.hard_anchor is None


def test_offsets_follow_clip_fps():
    sampler = FrameSampler(SamplingConfig(hard_negatives=False, positive_offsets_s=[1.0]))
    c = sampler.sample_clip(200, 25.0, make_rng(6, 0, 0, 0))
    assert abs(c.positive - c.anchor) == 25


def test_deterministic_and_fresh_per_epoch():
    def draw(seed, epoch, rank, worker):
        sampler = FrameSampler(SamplingConfig())
        rng = make_rng(seed, epoch, rank, worker)
        return [sampler.sample_clip(40, REFERENCE_FPS, rng) for _ in range(50)]

    assert draw(7, 0, 0, 0) == draw(7, 0, 0, 0)
    assert draw(7, 0, 0, 0) != draw(7, 1, 0, 0)
    assert draw(7, 0, 0, 0) != draw(7, 0, 1, 0)
    assert draw(7, 0, 0, 0) != draw(7, 0, 0, 1)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="sampling.weight_mode"):
        from_dict(SamplingConfig, {"weight_mode": "d"}, prefix="sampling.")
    with pytest.raises(ConfigError, match="sampling.positive_offsets_s"):
        SamplingConfig(positive_offsets_s=[]).validate()
