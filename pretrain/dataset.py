"""A pretraining dataset, opened once per rank: access checked, manifest read, shard URLs and sizes resolved.

The engine opens it (:func:`open_dataset`) and hands the value to everything that needs it (the preflight
checks, the clip stream, the donor stream/bank), so no part reads the manifest or probes the store again.

``url`` is either a dataset folder / ``s3://`` prefix holding ``manifest.json`` (the normal case), or
brace-expanded shard URLs (``.../shard-{000000..000009}.tar``, WebDataset's notation) for shards without a
manifest: each is then read once to count its samples (slow for big data: prefer a manifest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError
from data_shards import store

ShardReader = Callable[[str], Iterable[dict[str, Any]]]


@dataclass(frozen=True)
class Dataset:
    url: str
    shard_urls: tuple[str, ...]
    sample_counts: tuple[int, ...]  # samples (clips or frames) per shard, same order as shard_urls
    manifest: dict[str, Any] | None = None  # None for brace-expanded shard URLs

    @property
    def kind(self) -> str | None:
        """'clips' or 'frames' from the manifest; None when unknown (no manifest)."""
        return None if self.manifest is None else self.manifest.get("kind")

    @property
    def fps(self) -> float | None:
        """Frame rate the generator/ingest recorded, if any."""
        if self.manifest is None:
            return None
        fps = (self.manifest.get("generator") or {}).get("fps")
        return float(fps) if fps else None

    def max_clip_frames(self) -> int:
        """An upper bound of the longest clip: in a shard of n samples and f frames no clip exceeds f - n + 1."""
        if self.manifest is None:
            return 0
        shards = self.manifest["shards"]
        return max((int(s["frames"]) - int(s["samples"]) + 1 for s in shards if s["samples"]), default=0)


def expand_url(url: str) -> list[str]:
    """Brace-expanded shard URLs (``a-{0..2}.tar`` -> three URLs); a plain URL is itself."""
    if "{" not in url:
        return [url]
    import braceexpand

    return list(braceexpand.braceexpand(url))


def open_dataset(
    url: str,
    read_manifest: Callable[[str], dict] | None = None,
    read_shard: ShardReader | None = None,
    check_access: bool = True,
) -> Dataset:
    """Check that ``url`` can be read (a clear StoreError otherwise), read its manifest once, list its shards."""
    if not url:
        raise ConfigError(
            "config key 'data.url' is empty: give the dataset folder or s3:// prefix that holds manifest.json"
        )
    if check_access:  # wrong credentials / endpoint / path: one clear error before anything else
        store.check_access(expand_url(url)[0])
    if "{" in url:
        urls = expand_url(url)
        if read_shard is None:
            from data_shards.read import iter_samples as read_shard
        counts = [sum(1 for _ in read_shard(u)) for u in urls]
        return Dataset(url, tuple(urls), tuple(counts))
    if read_manifest is None:
        from data_shards.read import read_manifest
    manifest = read_manifest(url)
    shards = manifest["shards"]
    return Dataset(
        url,
        tuple(store.join(url, s["name"]) for s in shards),
        tuple(int(s["samples"]) for s in shards),
        manifest,
    )
