"""Readers for labelled face benchmarks in their published layouts -> ``LabelledFace`` records.

Each reader takes the user's path, yields faces resized to a square, and reports skipped rows through a
``skip(reason, detail)`` callable. A missing or malformed path raises :class:`LayoutError` naming the file
and the expected layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError


class LayoutError(UserError, ValueError):
    """The user path does not hold the expected dataset layout; the message says what was expected."""


@dataclass
class LabelledFace:
    key: str
    image: np.ndarray  # size x size x 3 uint8
    meta: dict[str, Any]  # the `frames` sample JSON


def frame_meta(
    source: str,
    split: str | None,
    expression: int = -1,
    identity_id: str | None = None,
    valence: float | None = None,
    arousal: float | None = None,
    landmarks: list | None = None,
) -> dict[str, Any]:
    return {
        "identity_id": identity_id,
        "expression": int(expression),
        "valence": valence,
        "arousal": arousal,
        "landmarks": landmarks,
        "source": source,
        "clip_id": None,
        "split": split,
    }


def safe_key(*parts: str) -> str:
    """A WebDataset-safe key (no dots or slashes) from file names and ids."""
    return "-".join(re.sub(r"[^A-Za-z0-9_-]+", "_", str(p)) for p in parts)


def square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an HxW or HxWx{1,3,4} image to size x size RGB uint8."""
    from PIL import Image

    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    return np.asarray(pil)


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def require_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise LayoutError(f"expected {path} (layout: {layout}); check --path")
    return path


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise LayoutError(f"--path {path} is not a folder (layout: {layout})")
    return path
