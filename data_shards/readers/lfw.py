"""LFW: one folder per person, ``lfw/<Person_Name>/<Person_Name>_0001.jpg``; identity labels only."""

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

LAYOUT = "PATH/<Person_Name>/<Person_Name>_0001.jpg (PATH is the 'lfw' folder or its parent)"


def _people_root(root: Path) -> Path:
    if (root / "lfw").is_dir():
        return root / "lfw"
    return root


def iter_faces(path: str | Path, size: int, skip: Callable[[str, str], None]) -> Iterator[LabelledFace]:
    root = _people_root(require_dir(Path(path), LAYOUT))
    people = sorted(p for p in root.iterdir() if p.is_dir())
    if not people:
        raise LayoutError(f"no person folders in {root} (layout: {LAYOUT})")
    for person in people:
        for image_path in sorted(person.glob("*.jpg")):
            if not image_path.stem.startswith(person.name + "_"):
                skip("lfw_unexpected_name", f"{image_path}: expected {person.name}_NNNN.jpg")
                continue
            try:
                image = load_image(image_path)
            except OSError as err:
                skip("unreadable_image", f"{image_path}: {err}")
                continue
            yield LabelledFace(
                key=safe_key("lfw", image_path.stem),
                image=square(image, size),
                meta=frame_meta("lfw", None, identity_id=person.name),
            )
