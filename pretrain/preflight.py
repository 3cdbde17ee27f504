"""Checks every rank runs before any process group or model is built, so a bad setting fails in seconds with one
line instead of after every rank waited for the others.

The engine calls, in order: :func:`configure_store` (the ``store`` retry policy must hold for the very first
request), then :func:`pretrain.dataset.open_dataset` (the data URL's access check and the one manifest read of
this rank), then :func:`check` with the opened dataset: the checkpoint mirror can be written, an image dataset
(manifest ``kind: frames``) is not asked for TimeAug or HardNeg, and the TimeAug offsets fit the dataset's clips.
Problems raise :class:`common.errors.ConfigError` or :class:`data_shards.store.StoreError`, which
``launch/pretrain.py`` prints as one line (exit code 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ConfigError
from data_shards import store
from pretrain.dataset import Dataset
from pretrain.sampling import REFERENCE_FPS, SamplingConfig, offsets_in_frames

if TYPE_CHECKING:
    from pretrain.config import PretrainConfig


def configure_store(cfg: PretrainConfig) -> None:
    """Apply the ``store`` section (retries, backoff, timeouts) before anything reaches the store."""
    store.configure(cfg.store)


def check(cfg: PretrainConfig, dataset: Dataset) -> None:
    """Everything about ``cfg`` that can fail before training, given this rank's opened ``dataset``."""
    check_mirror_writable(cfg.checkpoint.mirror_url)
    check_images_need_no_clips(cfg.sampling, dataset)
    check_offsets_fit(cfg.sampling, dataset)


def check_mirror_writable(mirror_url: str | None) -> None:
    """Wrong credentials or endpoint for ``checkpoint.mirror_url`` fail now, not at the first checkpoint."""
    if mirror_url and "{" not in mirror_url:
        store.check_access(mirror_url, write=True)


def check_images_need_no_clips(sampling: SamplingConfig, dataset: Dataset) -> None:
    """An image dataset (``kind: frames``) has one frame per sample: TimeAug positives (another frame of the clip)
    and HardNeg second anchors (a distant frame of the clip) do not exist, so asking for them is one clear error
    naming every such key, not a silent fallback to SimCLR. (Brace-expanded shard URLs have no manifest, hence no
    kind: their images are then sampled as one-frame clips, counted as ``single_frame`` / ``hard_negative_short``.)
    """
    if dataset.kind != "frames":
        return
    asked = []
    if sampling.strategy == "timeaug":
        asked.append(("sampling.strategy", "timeaug"))
    if sampling.hard_negatives:
        asked.append(("sampling.hard_negatives", "true"))
    if not asked:
        return
    plural = len(asked) > 1
    keys = " and ".join(f"'{key}'" for key, _ in asked)
    values = " and ".join(f"{key}={value}" for key, value in asked)
    raise ConfigError(
        f"config key{'s' if plural else ''} {keys}: {dataset.url} is an image dataset (manifest kind 'frames': "
        f"one image per sample), but {values} need{'' if plural else 's'} clips (TimeAug draws its positive from "
        "another frame, HardNeg its second anchor from a distant frame of the same clip); pretrain on images with "
        "sampling.strategy=simclr sampling.hard_negatives=false (SimCLR views, FaceSwap and MaskFN work on images)"
    )


def check_offsets_fit(sampling: SamplingConfig, dataset: Dataset) -> None:
    """TimeAug needs at least one positive offset shorter than some clip of the dataset."""
    if sampling.strategy != "timeaug" or dataset.kind != "clips":
        return
    longest = dataset.max_clip_frames()
    fps = dataset.fps or REFERENCE_FPS
    shortest = int(offsets_in_frames(sampling.positive_offsets_s, fps).min())
    if longest and shortest >= longest:
        raise ConfigError(
            f"config key 'sampling.positive_offsets_s': the shortest offset {min(sampling.positive_offsets_s)} s "
            f"is {shortest} frames at {fps:.3g} fps, but no clip of {dataset.url} has more than {longest} "
            f"frames: no positive could ever be drawn; use offsets below {longest / fps:.2f} s"
        )
