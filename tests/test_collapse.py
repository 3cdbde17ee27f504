"""The collapse detector: flagged after a window at chance, cleared by progress, one warning."""

from __future__ import annotations

import logging

import pytest

from common.errors import ConfigError
from pretrain.collapse import CollapseConfig, CollapseDetector


def test_flags_a_run_that_stays_at_chance_for_the_window(caplog):
    detector = CollapseDetector(CollapseConfig(window_steps=100, chance_factor=5.0))
    negatives = 61.0  # chance 1/62 ~ 0.016; the line is 5x that, ~0.08
    with caplog.at_level(logging.WARNING, logger="pretrain.collapse"):
        flags = [detector.update(step, 0.05, negatives) for step in range(0, 201, 50)]
    assert flags == [False, False, True, True, True]
    warnings = [r for r in caplog.records if "looks collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "faceswap.start_step" in warnings[0].getMessage()


def test_progress_clears_the_flag_and_a_learning_run_is_never_flagged():
    detector = CollapseDetector(CollapseConfig(window_steps=100))
    assert [detector.update(s, 0.03, 61) for s in (0, 50, 100)] == [False, False, True]
    assert detector.update(150, 0.4, 61) is False  # learning again
    learning = CollapseDetector(CollapseConfig(window_steps=100))
    # early steps at chance, then the positive wins: never flagged
    assert not any(learning.update(s, 0.02 if s < 80 else 0.5, 61) for s in range(0, 1000, 10))


def test_off_and_bad_values():
    assert CollapseDetector(CollapseConfig(window_steps=0)).update(10_000, 0.0, 61) is False
    with pytest.raises(ConfigError, match="collapse.window_steps"):
        CollapseConfig(window_steps=-1).validate()
    with pytest.raises(ConfigError, match="collapse.chance_factor"):
        CollapseConfig(chance_factor=0).validate()
