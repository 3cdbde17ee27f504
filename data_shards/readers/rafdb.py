"""RAF-DB basic: ``EmoLabel/list_patition_label.txt`` ("train_00001.jpg 5") + ``Image/aligned|original``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

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
    "PATH/EmoLabel/list_patition_label.txt (lines 'train_00001.jpg 5') and images in "
    "PATH/Image/aligned/train_00001_aligned.jpg or PATH/Image/original/train_00001.jpg"
)
# RAF-DB ids 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral -> AffectNet-8 ids.
RAF_TO_AFFECTNET = {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6, 7: 0}


def _label_file(root: Path) -> Path:
    for candidate in (root / "EmoLabel" / "list_patition_label.txt", root / "list_patition_label.txt"):
        if candidate.is_file():
            return candidate
    raise LayoutError(f"no list_patition_label.txt under {root} (layout: {LAYOUT})")


def _image_path(root: Path, name: str) -> Path | None:
    stem = Path(name).stem
    for candidate in (
        root / "Image" / "aligned" / f"{stem}_aligned.jpg",
        root / "Image" / "aligned" / name,
        root / "Image" / "original" / name,
    ):
        if candidate.is_file():
            return candidate
    return None


def iter_faces(path: str | Path, size: int, skip: Callable[[str, str], None]) -> Iterator[LabelledFace]:
    root = require_dir(Path(path), LAYOUT)
    labels = _label_file(root)
    for line_number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{labels}:{line_number}"
        fields = line.split()
        try:
            name, raf_id = fields[0], int(fields[1])
        except (IndexError, ValueError):
            skip("rafdb_bad_line", f"{where}: {line!r}")
            continue
        if raf_id not in RAF_TO_AFFECTNET:
            skip("rafdb_bad_label", f"{where}: label {raf_id}")
            continue
        image_path = _image_path(root, name)
        if image_path is None:
            skip("missing_image", f"{where}: {name} not under {root / 'Image'}")
            continue
        try:
            image = load_image(image_path)
        except OSError as err:
            skip("unreadable_image", f"{image_path}: {err}")
            continue
        split = "train" if name.startswith("train") else "test" if name.startswith("test") else None
        yield LabelledFace(
            key=safe_key("rafdb", Path(name).stem),
            image=square(image, size),
            meta=frame_meta("rafdb", split, expression=RAF_TO_AFFECTNET[raf_id]),
        )
