"""AffectNet: ``training.csv`` / ``validation.csv`` + images under ``Manually_Annotated_Images/``.

Columns: subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks, expression,
valence, arousal. Classes 0-7 are AffectNet-8; 8 None, 9 Uncertain, 10 No-Face are skipped and counted.
The face box is cropped and the landmarks are moved into the resized crop.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_shards.readers import (
    LabelledFace,
    LayoutError,
    frame_meta,
    load_image,
    require_dir,
    safe_key,
    square,
)

LAYOUT = (
    "PATH/training.csv and/or PATH/validation.csv (columns subDirectory_filePath, face_x, face_y, face_width, "
    "face_height, facial_landmarks, expression, valence, arousal) with images at "
    "PATH/Manually_Annotated_Images/<subDirectory_filePath> or PATH/<subDirectory_filePath>"
)
COLUMNS = {"subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression"}
# The validation set is AffectNet's de-facto test set (the test set was never released).
CSV_SPLITS = (("training.csv", "train"), ("validation.csv", "test"))
SKIPPED_CLASSES = {8: "affectnet_none", 9: "affectnet_uncertain", 10: "affectnet_no_face"}


def _image_path(root: Path, relative: str) -> Path | None:
    for candidate in (root / "Manually_Annotated_Images" / relative, root / relative):
        if candidate.is_file():
            return candidate
    return None


def _affect(value: str | None) -> float | None:
    """Valence/arousal in [-1, 1]; AffectNet writes -2 for 'not annotated'."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if -1.0 <= number <= 1.0 else None


def _landmarks(text: str | None, box: tuple[int, int, int, int], size: int) -> list | None:
    if not text:
        return None
    try:
        values = np.array([float(v) for v in text.replace(",", ";").split(";") if v.strip()])
    except ValueError:
        return None
    if values.size != 136:
        return None
    x, y, w, h = box
    points = values.reshape(68, 2) - np.array([x, y])
    points *= np.array([size / w, size / h])
    return np.round(points, 2).tolist()


def _rows(root: Path) -> Iterator[tuple[Path, int, dict, str]]:
    found = False
    for name, split in CSV_SPLITS:
        csv_path = root / name
        if not csv_path.is_file():
            continue
        found = True
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = COLUMNS - set(reader.fieldnames or [])
            if missing:
                raise LayoutError(f"{csv_path} lacks columns {sorted(missing)} (layout: {LAYOUT})")
            for row_number, row in enumerate(reader, start=2):
                yield csv_path, row_number, row, split
    if not found:
        raise LayoutError(f"neither training.csv nor validation.csv in {root} (layout: {LAYOUT})")


def iter_faces(path: str | Path, size: int, skip: Callable[[str, str], None]) -> Iterator[LabelledFace]:
    root = require_dir(Path(path), LAYOUT)
    for csv_path, row_number, row, split in _rows(root):
        where = f"{csv_path}:{row_number}"
        try:
            expression = int(row["expression"])
            box = tuple(int(float(row[k])) for k in ("face_x", "face_y", "face_width", "face_height"))
        except (TypeError, ValueError) as err:
            skip("affectnet_bad_row", f"{where}: {err}")
            continue
        if expression in SKIPPED_CLASSES:
            skip(SKIPPED_CLASSES[expression], where)
            continue
        if not 0 <= expression <= 7:
            skip("affectnet_bad_label", f"{where}: expression {expression}")
            continue
        image_path = _image_path(root, row["subDirectory_filePath"])
        if image_path is None:
            skip("missing_image", f"{where}: {row['subDirectory_filePath']}")
            continue
        try:
            image = load_image(image_path)
        except OSError as err:
            skip("unreadable_image", f"{image_path}: {err}")
            continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            skip("affectnet_bad_box", f"{where}: face box {box}")
            continue
        crop = image[max(y, 0) : y + h, max(x, 0) : x + w]
        if crop.size == 0:
            skip(
                "affectnet_bad_box",
                f"{where}: face box {box} outside the {image.shape[1]}x{image.shape[0]} image",
            )
            continue
        yield LabelledFace(
            key=safe_key("affectnet", split, Path(row["subDirectory_filePath"]).with_suffix("").as_posix()),
            image=square(crop, size),
            meta=frame_meta(
                "affectnet",
                split,
                expression=expression,
                valence=_affect(row.get("valence")),
                arousal=_affect(row.get("arousal")),
                landmarks=_landmarks(row.get("facial_landmarks"), box, size),
            ),
        )
