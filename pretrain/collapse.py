"""Notice a collapsed run: positive top-1 stuck near chance for a window of steps.

A collapsed contrastive run (a near-constant embedding) keeps training without an error: its loss sits near
ln(negatives + 1) and its positive beats the negatives about as often as a random guess. On SynthFace this is
what FaceSwap from scratch did on 2 of 3 seeds (docs/results/FINDINGS.md). The detector turns that into one
clear warning naming the likely causes and the keys to change, and a metric a dashboard panel shows, early
enough to stop a run before days of GPU time are spent on it.

It watches the all-reduced positive top-1 at each logging step. Top-1 counts as "at chance" when it is below
``collapse.chance_factor`` x chance (chance = 1 / (negatives per row + 1)); the run is flagged when it has stayed
there for ``collapse.window_steps`` consecutive steps. Any logging step above the line clears the flag. The
state restarts on resume (a collapse that continues is flagged again one window later).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.errors import ConfigError

log = logging.getLogger(__name__)

ADVICE = (
    "likely causes and the keys to change: FaceSwap from the first step (faceswap.start_step and "
    "faceswap.p_warmup_steps: learn from the other strategies first, then ramp it in; or a lower faceswap.p; "
    "faceswap.donors=stream so a donor is not also a negative), a temperature too low for the batch "
    "(loss.temperature), a learning rate too high (optim.lr, optim.warmup_steps)"
)


@dataclass
class CollapseConfig:
    window_steps: int = 500  # steps positive top-1 must stay at chance before the run is flagged; 0: off
    chance_factor: float = (
        5.0  # top-1 below this many times chance (1 / (negatives per row + 1)) is "at chance"
    )

    def validate(self) -> None:
        if self.window_steps < 0:
            raise ConfigError(f"config key 'collapse.window_steps': must be >= 0, got {self.window_steps}")
        if self.chance_factor <= 0:
            raise ConfigError(f"config key 'collapse.chance_factor': must be > 0, got {self.chance_factor}")


class CollapseDetector:
    """Fed the reduced positive top-1 at each logging step; says whether the run looks collapsed."""

    def __init__(self, cfg: CollapseConfig) -> None:
        self.cfg = cfg
        self.low_since: int | None = None  # first step of the current run of at-chance logging steps
        self.suspected = False
        self.warned = False

    def update(self, step: int, positive_top1: float, negatives_per_row: float) -> bool:
        """Record one logging step; returns whether a collapse is suspected now (and warns once when it is)."""
        if not self.cfg.window_steps:
            return False
        chance = 1.0 / (max(negatives_per_row, 0.0) + 1.0)
        if positive_top1 < self.cfg.chance_factor * chance:
            if self.low_since is None:
                self.low_since = step
        else:
            self.low_since = None
        self.suspected = self.low_since is not None and step - self.low_since >= self.cfg.window_steps
        if self.suspected and not self.warned:
            self.warned = True
            log.warning(
                "positive top-1 has stayed at %.3f (chance %.3f) since step %d: the run looks collapsed "
                "(a near-constant embedding that no longer learns); %s",
                positive_top1, chance, self.low_since, ADVICE,
            )  # fmt: skip
        return self.suspected
