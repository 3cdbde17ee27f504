"""Labelled ``frames`` datasets for evaluation, and the splits the probes use.

Frames are read one at a time (:func:`iter_frames`): streamed into features in bounded memory
(``eval/stream.py``), or gathered whole into memory (:func:`load_frames`, for fine-tuning, which needs the
pixels). Reading goes through ``data_shards.read`` (local folders and ``s3://``); the reader is injectable so
tests and tools can pass their own.

Splits (all seeded, so every seed gives a different but reproducible split):
* If the samples carry both ``split == "train"`` and ``split == "test"`` (real benchmarks), those are used.
* Otherwise, expression and V/A probes split by identity: a fraction of identities is held out for testing, so
  no person appears on both sides (a probe cannot score by recognising the person).
* Samples without an identity (``identity_id`` null) are split per sample.
* Identity leakage is measured across clips, never within one: per identity with >= 2 clips, the frames of
  half its clips form the gallery and the frames of the other clips the probes (frames of one clip are
  near-duplicates: matching them measures memory of a clip, not identity). Samples without a ``clip_id`` are
  each their own clip (image datasets). The eval set's identities are disjoint from pretraining by
  construction (SynthFace identity splits), so this measures how much identity the frozen features carry
  for unseen people.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import ConfigError

Reader = Callable[[str], Iterator[dict[str, Any]]]


@dataclass
class FramesData:
    """One eval dataset in memory; arrays are aligned with ``keys``."""

    name: str
    url: str
    keys: list[str]
    jpegs: list[bytes]
    expression: np.ndarray  # int64, -1 unknown
    valence: np.ndarray  # float32, NaN unknown
    arousal: np.ndarray  # float32, NaN unknown
    identity: np.ndarray  # object array of str, "" unknown
    split: np.ndarray  # object array of str
    manifest: dict[str, Any] = field(default_factory=dict)
    clip: np.ndarray | None = None  # object array of str: the clip each frame comes from (its key if none)
    skipped: dict[str, int] = field(default_factory=dict)  # samples left out by reason (bad JPEG, ...)

    def __len__(self) -> int:
        return len(self.keys)

    def labels(self) -> FramesLabels:
        """The labels without the images: what probe tasks need (small to ship between Ray workers)."""
        return FramesLabels(
            name=self.name,
            expression=self.expression,
            valence=self.valence,
            arousal=self.arousal,
            identity=self.identity,
            split=self.split,
            clip=self.clip,
        )


@dataclass
class FramesLabels:
    name: str
    expression: np.ndarray
    valence: np.ndarray
    arousal: np.ndarray
    identity: np.ndarray
    split: np.ndarray
    clip: np.ndarray | None = None  # None: every frame its own clip


def dataset_name(url: str) -> str:
    """Short display name: the last path component of the dataset URL."""
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def default_io() -> tuple[Callable[[str], dict], Reader, Callable[[str, str], str]]:
    """(read_manifest, iter_samples, join) from ``data_shards.read`` (local paths and s3://)."""
    from data_shards import read as shard_read

    return shard_read.read_manifest, shard_read.iter_samples, shard_read.join


def check_dataset(url: str, read_manifest: Callable[[str], dict] | None = None) -> dict[str, Any]:
    """Read the manifest or raise one ConfigError naming ``--data`` and the URL."""
    read_manifest = read_manifest or default_io()[0]
    try:
        manifest = read_manifest(url)
    except Exception as err:  # noqa: BLE001 - any failure here means "not a dataset"
        raise ConfigError(
            f"--data '{url}': no readable manifest.json there ({type(err).__name__}: {err}); "
            "give the folder or s3:// prefix written by `python -m data_shards evalset`"
        ) from err
    if manifest.get("kind") != "frames":
        raise ConfigError(
            f"--data '{url}': manifest kind is {manifest.get('kind')!r}, evaluation needs a 'frames' dataset "
            "(build one with `python -m data_shards evalset`)"
        )
    return manifest


def _float_or_nan(value: Any) -> float:
    """A finite number, else NaN (unknown): strings, lists, Infinity and NaN from hostile JSON included."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return float("nan")
    value = float(value)
    return value if np.isfinite(value) else float("nan")


def _expression_or_unknown(value: Any) -> int:
    """An expression class 0..7, else -1 (unknown)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        return -1
    return int(value) if 0 <= value < 8 else -1


def usable_jpeg(data: Any) -> str | None:
    """None if ``data`` is a JPEG of sane declared size that PIL can parse, else why not (nothing decoded)."""
    import io

    from PIL import Image

    from data_shards.jpeg_header import BadJpeg, check_jpeg, max_side_for

    if not isinstance(data, bytes | bytearray):
        return "not JPEG bytes"
    try:
        check_jpeg(data, max_side_for(None))
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (BadJpeg, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


@dataclass
class FrameRow:
    """The labels of one usable frame (what :func:`iter_frames` yields beside its JPEG bytes)."""

    key: str
    expression: int
    valence: float
    arousal: float
    identity: str
    split: str
    clip: str


def iter_frames(
    url: str,
    manifest: dict[str, Any],
    iter_samples: Reader | None = None,
    max_samples: int | None = None,
    skipped: Callable[..., None] | None = None,
) -> Iterator[tuple[FrameRow, bytes]]:
    """Every usable frame of a ``frames`` dataset, shards in manifest order, one at a time: bounded memory.

    What cannot be used is left out and counted by ``skipped(reason, message)`` (``not_a_frame``,
    ``corrupt_jpeg``); the dataset is still evaluated."""
    _, default_iter, join = default_io()
    iter_samples = iter_samples or default_iter
    skipped = skipped or (lambda reason, message: None)
    count = 0
    for shard in manifest["shards"]:
        for sample in iter_samples(join(url, shard["name"])):
            meta = sample["meta"]
            if "jpeg" not in sample:
                skipped("not_a_frame", f"{url} sample {sample.get('key')}: a clip in a frames dataset")
                continue
            problem = usable_jpeg(sample["jpeg"])
            if problem is not None:  # one bad image is left out and counted; the dataset is still evaluated
                skipped("corrupt_jpeg", f"{url} sample {sample.get('key')}: {problem}")
                continue
            identity = meta.get("identity_id")
            clip_id = meta.get("clip_id")
            row = FrameRow(
                key=sample["key"],
                expression=_expression_or_unknown(meta.get("expression")),
                valence=_float_or_nan(meta.get("valence")),
                arousal=_float_or_nan(meta.get("arousal")),
                identity=str(identity)
                if isinstance(identity, str | int) and not isinstance(identity, bool)
                else "",
                split=meta.get("split") or manifest.get("split") or "",
                clip=str(clip_id) if isinstance(clip_id, str | int) and clip_id != "" else sample["key"],
            )
            yield row, sample["jpeg"]
            count += 1
            if max_samples and count >= max_samples:
                return


class LabelColumns:
    """Accumulates :class:`FrameRow` values into the label arrays of :class:`FramesLabels`."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._rows: list[FrameRow] = []

    def add(self, row: FrameRow) -> None:
        self.keys.append(row.key)
        self._rows.append(row)

    def __len__(self) -> int:
        return len(self.keys)

    def arrays(self) -> dict[str, np.ndarray]:
        rows = self._rows
        return {
            "expression": np.asarray([r.expression for r in rows], dtype=np.int64),
            "valence": np.asarray([r.valence for r in rows], dtype=np.float32),
            "arousal": np.asarray([r.arousal for r in rows], dtype=np.float32),
            "identity": np.asarray([r.identity for r in rows], dtype=object),
            "split": np.asarray([r.split for r in rows], dtype=object),
            "clip": np.asarray([r.clip for r in rows], dtype=object),
        }

    def labels(self, name: str) -> FramesLabels:
        return FramesLabels(name=name, **self.arrays())


def no_samples(url: str) -> ConfigError:
    return ConfigError(f"--data '{url}': the dataset has no samples")


def load_frames(
    url: str,
    read_manifest: Callable[[str], dict] | None = None,
    iter_samples: Reader | None = None,
    max_samples: int | None = None,
) -> FramesData:
    """Read every usable sample of a ``frames`` dataset into memory (shards in manifest order)."""
    from data_shards.read import SkipCounter

    manifest = check_dataset(url, read_manifest or default_io()[0])
    skipped = SkipCounter()
    columns, jpegs = LabelColumns(), []
    for row, jpeg in iter_frames(url, manifest, iter_samples, max_samples, skipped):
        columns.add(row)
        jpegs.append(jpeg)
    if not columns:
        raise no_samples(url)
    return FramesData(
        name=dataset_name(url),
        url=url,
        keys=columns.keys,
        jpegs=jpegs,
        manifest=manifest,
        skipped=skipped.as_dict(),
        **columns.arrays(),
    )


def train_test_split(
    labels: FramesLabels, seed: int, test_fraction: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test) following the rules in the module docstring."""
    n = len(labels.identity)
    is_train = labels.split == "train"
    is_test = labels.split == "test"
    if is_train.any() and is_test.any():
        return np.flatnonzero(is_train), np.flatnonzero(is_test)
    rng = np.random.default_rng(seed)
    known = labels.identity != ""
    test_mask = np.zeros(n, dtype=bool)
    identities = np.unique(labels.identity[known])
    if len(identities) >= 2:
        n_test = min(max(1, round(test_fraction * len(identities))), len(identities) - 1)
        held_out = rng.choice(identities, size=n_test, replace=False)
        test_mask[known] = np.isin(labels.identity[known], held_out)
    anonymous = np.flatnonzero(~known)
    if anonymous.size:
        test_mask[anonymous] = rng.random(anonymous.size) < test_fraction
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def clips_or_frames(identity: np.ndarray, clip: np.ndarray | None) -> np.ndarray:
    """The clip of each frame; without clip labels every frame is its own clip."""
    if clip is None:
        return np.asarray([f"#{i}" for i in range(len(identity))], dtype=object)
    return np.asarray(clip, dtype=object)


def gallery_probe_split(
    identity: np.ndarray, seed: int, clip: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per identity with >= 2 clips: the frames of half its clips (rounded down, at least 1) are the gallery,
    the frames of its other clips the probes, so no probe has a frame of its own clip in the gallery."""
    rng = np.random.default_rng(seed)
    clip = clips_or_frames(identity, clip)
    gallery, probe = [], []
    for ident in np.unique(identity[identity != ""]):
        members = np.flatnonzero(identity == ident)
        clips = rng.permutation(np.unique(clip[members]))
        if clips.size < 2:
            continue
        in_gallery = np.isin(clip[members], clips[: max(1, clips.size // 2)])
        gallery.extend(members[in_gallery])
        probe.extend(members[~in_gallery])
    return np.asarray(sorted(gallery), dtype=np.int64), np.asarray(sorted(probe), dtype=np.int64)


def carve_validation(n: int, seed: int, fraction: float = 0.2, groups: np.ndarray | None = None):
    """Split ``range(n)`` into (fit, val) for model selection, by group when groups are given."""
    rng = np.random.default_rng(seed + 7919)  # decorrelated from the train/test split's stream
    if groups is not None and len(np.unique(groups)) >= 3:
        uniq = np.unique(groups)
        n_val = max(1, round(fraction * len(uniq)))
        val_groups = rng.choice(uniq, size=n_val, replace=False)
        val_mask = np.isin(groups, val_groups)
    else:
        val_mask = np.zeros(n, dtype=bool)
        val_mask[rng.permutation(n)[: max(1, round(fraction * n))]] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def write_toy_frames(
    url: str, identities: int = 6, per_identity: int = 16, size: int = 64, seed: int = 0
) -> str:
    """A tiny labelled ``frames`` dataset for smoke tests and benchmarks (not a face model).

    Identity = background colour; expression = the position/colour of a small patch; V/A follow the
    expression with noise. Written with ``data_shards.write.ShardWriter`` (manifest committed last).
    """
    from data_shards.write import ShardWriter, encode_jpeg

    rng = np.random.default_rng(seed)
    with ShardWriter(
        url, kind="frames", split="eval", generator={"toy": True, "seed": seed}, max_samples=64
    ) as w:
        for ident in range(identities):
            background = rng.integers(0, 256, size=3)
            for j in range(per_identity):
                expression = int(rng.integers(0, 8))
                noise = rng.integers(-6, 7, size=(size, size, 3))
                image = np.clip(background + noise, 0, 255).astype(np.uint8)
                row, col = divmod(expression, 4)
                cell = size // 4
                top, left = size // 4 + row * cell, col * cell
                image[top : top + cell, left : left + cell] = (255 * (expression % 2), 35 * expression, 200)
                w.write(
                    f"toy-i{ident:03d}-f{j:03d}",
                    encode_jpeg(image),
                    {
                        "identity_id": f"toy{ident:03d}",
                        "expression": expression,
                        "valence": float(np.tanh(expression / 4 - 1) + 0.05 * rng.normal()),
                        "arousal": float(np.cos(expression) * 0.8 + 0.05 * rng.normal()),
                        "landmarks": None,
                        "source": "toy",
                        "clip_id": None,
                        "split": "eval",
                    },
                )
    return url
