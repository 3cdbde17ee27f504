"""Frozen features of a whole ``frames`` dataset in bounded memory: frames are read, decoded and embedded one
chunk of ``features.batch_size`` at a time, straight from the store.

What stays resident grows only with the output (N x D float32 features and the small label arrays), not with
the JPEGs: at most one chunk of JPEG bytes is held at any time (``StreamedFeatures.max_resident_jpegs`` says
how many were). The features equal ``eval.features.extract_features`` on ``eval.data.load_frames``'s JPEGs bit
for bit: the same chunks go through the same backbone in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from eval.data import (
    FramesLabels,
    LabelColumns,
    Reader,
    check_dataset,
    dataset_name,
    default_io,
    iter_frames,
    no_samples,
)
from eval.features import FeatureConfig, embed, run_preprocessing


@dataclass
class StreamedFeatures:
    features: np.ndarray  # (N, D) float32, rows aligned with keys
    labels: FramesLabels
    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # frames left out by reason
    max_resident_jpegs: int = 0  # the most JPEGs held at once (<= features.batch_size)


class _Rows:
    """A float32 (N, D) array filled chunk by chunk; capacity from the manifest, grown only if it was short.

    float32 because that is what ``embed`` returns and what the probes were fitted on: float16 would halve the
    only part that grows (100k x 64 features: 24 MiB of the +61 MiB measured from 10k to 100k frames) but
    lose bit-identity with the in-memory path for a saving the memory goal does not need."""

    def __init__(self, capacity: int):
        self.capacity, self.n, self.array = max(1, capacity), 0, None

    def add(self, chunk: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.capacity, chunk.shape[1]), np.float32)
        if self.n + len(chunk) > len(self.array):  # a manifest that under-counts: grow, never fail
            grown = np.empty((max(2 * len(self.array), self.n + len(chunk)), chunk.shape[1]), np.float32)
            grown[: self.n] = self.array[: self.n]
            self.array = grown
        self.array[self.n : self.n + len(chunk)] = chunk
        self.n += len(chunk)

    def result(self) -> np.ndarray:
        return self.array[: self.n] if self.array is not None else np.zeros((0, 0), np.float32)


def stream_features(
    checkpoint: str,
    url: str,
    cfg: FeatureConfig | None = None,
    max_samples: int | None = None,
    read_manifest: Callable[[str], dict] | None = None,
    iter_samples: Reader | None = None,
    progress: bool = False,
) -> StreamedFeatures:
    """Embed every usable frame of the dataset at ``url`` with ``backbone.pt`` ``checkpoint``."""
    from tqdm import tqdm

    from data_shards.read import SkipCounter
    from pretrain.model import load_backbone

    cfg = run_preprocessing(checkpoint, cfg or FeatureConfig())
    manifest = check_dataset(url, read_manifest or default_io()[0])
    total = sum(int(s.get("samples") or 0) for s in manifest["shards"])
    total = min(total, max_samples) if max_samples else total
    backbone = load_backbone(checkpoint)
    skipped = SkipCounter()
    columns, rows, chunk, most = LabelColumns(), _Rows(total), [], 0
    bar = tqdm(total=total or None, desc=f"features {dataset_name(url)}", unit="img", disable=not progress)
    try:
        for row, jpeg in iter_frames(url, manifest, iter_samples, max_samples, skipped):
            columns.add(row)
            chunk.append(jpeg)
            if len(chunk) == cfg.batch_size:
                most = max(most, len(chunk))
                rows.add(embed(backbone, chunk, cfg))
                bar.update(len(chunk))
                chunk = []
        if chunk:
            most = max(most, len(chunk))
            rows.add(embed(backbone, chunk, cfg))
            bar.update(len(chunk))
    finally:
        bar.close()
    if not columns:
        raise no_samples(url)
    return StreamedFeatures(
        features=rows.result(),
        labels=columns.labels(dataset_name(url)),
        keys=columns.keys,
        skipped=skipped.as_dict(),
        max_resident_jpegs=most,
    )
