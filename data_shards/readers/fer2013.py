"""FER2013: ``fer2013.csv`` with columns ``emotion,pixels,Usage`` (48x48 grayscale, space-separated)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_shards.readers import LabelledFace, LayoutError, frame_meta, require_file, safe_key, square

LAYOUT = "PATH/fer2013.csv (or PATH is that file) with header emotion,pixels,Usage"
# FER2013 ids 0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral -> AffectNet-8 ids.
FER_TO_AFFECTNET = {0: 6, 1: 5, 2: 4, 3: 1, 4: 2, 5: 3, 6: 0}
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SIDE = 48


def iter_faces(path: str | Path, size: int, skip: Callable[[str, str], None]) -> Iterator[LabelledFace]:
    path = Path(path)
    csv_path = require_file(path if path.suffix == ".csv" else path / "fer2013.csv", LAYOUT)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"emotion", "pixels", "Usage"} - set(reader.fieldnames or [])
        if missing:
            raise LayoutError(f"{csv_path} lacks columns {sorted(missing)} (layout: {LAYOUT})")
        for row_number, row in enumerate(reader, start=2):
            where = f"{csv_path}:{row_number}"
            try:
                emotion = int(row["emotion"])
                pixels = np.array(row["pixels"].split(), dtype=np.uint8)
            except (TypeError, ValueError) as err:
                skip("fer2013_bad_row", f"{where}: {err}")
                continue
            if emotion not in FER_TO_AFFECTNET:
                skip("fer2013_bad_label", f"{where}: emotion {emotion}")
                continue
            if pixels.size != SIDE * SIDE:
                skip("fer2013_bad_pixels", f"{where}: {pixels.size} pixels, expected {SIDE * SIDE}")
                continue
            split = USAGE_TO_SPLIT.get(row["Usage"], row["Usage"].lower() or None)
            yield LabelledFace(
                key=safe_key("fer2013", f"{row_number - 2:06d}"),
                image=square(pixels.reshape(SIDE, SIDE), size),
                meta=frame_meta("fer2013", split, expression=FER_TO_AFFECTNET[emotion]),
            )
