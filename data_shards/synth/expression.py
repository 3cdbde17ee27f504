"""The 8 expression classes as facial action unit (AU) prototypes, with valence/arousal per class."""

from __future__ import annotations

import numpy as np

from data_shards.labels import EXPRESSIONS

AU_NAMES: tuple[str, ...] = (
    "AU1",  # inner brow raiser
    "AU2",  # outer brow raiser
    "AU4",  # brow lowerer
    "AU5",  # upper lid raiser
    "AU6",  # cheek raiser
    "AU7",  # lid tightener
    "AU9",  # nose wrinkler
    "AU10",  # upper lip raiser
    "AU12",  # lip corner puller
    "AU14",  # dimpler (one-sided here: contempt)
    "AU15",  # lip corner depressor
    "AU20",  # lip stretcher
    "AU23",  # lip tightener
    "AU26",  # jaw drop
)
AU = {name: i for i, name in enumerate(AU_NAMES)}

# Full-intensity AU patterns (after EMFACS-style prototypes), in AffectNet-8 order.
_PROTOTYPES: dict[str, dict[str, float]] = {
    "Neutral": {},
    "Happy": {"AU6": 0.8, "AU12": 1.0, "AU26": 0.2},
    "Sad": {"AU1": 1.0, "AU4": 0.5, "AU15": 1.0},
    "Surprise": {"AU1": 1.0, "AU2": 1.0, "AU5": 1.0, "AU26": 1.0},
    "Fear": {"AU1": 1.0, "AU2": 0.6, "AU4": 0.7, "AU5": 1.0, "AU20": 1.0, "AU26": 0.4},
    "Disgust": {"AU4": 0.4, "AU9": 1.0, "AU10": 1.0, "AU15": 0.4},
    "Anger": {"AU4": 1.0, "AU5": 0.5, "AU7": 1.0, "AU23": 1.0},
    "Contempt": {"AU14": 1.0, "AU12": 0.15},
}
PROTOTYPES = np.zeros((len(EXPRESSIONS), len(AU_NAMES)), dtype=np.float64)
for _cls, _name in enumerate(EXPRESSIONS):
    for _au, _value in _PROTOTYPES[_name].items():
        PROTOTYPES[_cls, AU[_au]] = _value

# Circumplex position of each class at full intensity (valence, arousal).
VALENCE_AROUSAL = np.array(
    [
        [0.0, 0.0],  # Neutral
        [0.8, 0.45],  # Happy
        [-0.65, -0.4],  # Sad
        [0.25, 0.8],  # Surprise
        [-0.65, 0.75],  # Fear
        [-0.7, 0.3],  # Disgust
        [-0.6, 0.65],  # Anger
        [-0.45, 0.15],  # Contempt
    ]
)


def expression_target(
    cls: int, intensity: float, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """AU vector and (valence, arousal) for one expression segment; ``rng`` adds per-segment jitter."""
    au = PROTOTYPES[cls] * intensity
    va = VALENCE_AROUSAL[cls] * intensity
    if rng is not None:
        au = au + rng.normal(0, 0.04, size=au.shape)
        va = va + rng.normal(0, 0.07, size=2)
    return np.clip(au, 0, 1), np.clip(va, -1, 1)
