"""The ``manifest.json`` of a shard dataset: its schema, construction and checks.

The manifest is written last and is the commit point of a dataset: a folder/prefix without one is
incomplete. Shard names are relative to the dataset URL and are whatever the manifest lists: readers never
derive them. :class:`data_shards.write.ShardWriter` names a write's shards ``shard-NNNNNN.tar`` when it could
claim those names (a fresh prefix), else ``shard-<write_id>-NNNNNN.tar``, so two writes never share a shard
name; the manifest's ``write_id`` says which write it commits (absent in manifests of older writers).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("clips", "frames")


class ManifestError(UserError, ValueError):
    """A manifest is missing or does not follow the schema; the message names the URL and field."""


@dataclass
class ShardEntry:
    name: str
    samples: int
    frames: int
    bytes: int
    sha256: str


def shard_name(index: int, tag: str | None = None) -> str:
    """``shard-000012.tar``, or ``shard-<tag>-000012.tar`` for a write that could not claim the plain names."""
    return f"shard-{index:06d}.tar" if tag is None else f"shard-{tag}-{index:06d}.tar"


def build_manifest(
    kind: str,
    split: str,
    generator: dict[str, Any],
    shards: list[ShardEntry],
    identities: int,
    skipped: dict[str, int],
    write_id: str | None = None,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "split": split,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "generator": generator,
        "shards": [asdict(s) for s in shards],
        "totals": {
            "shards": len(shards),
            "samples": sum(s.samples for s in shards),
            "frames": sum(s.frames for s in shards),
            "bytes": sum(s.bytes for s in shards),
            "identities": identities,
        },
        "skipped": dict(sorted(skipped.items())),
    }
    if write_id is not None:
        manifest["write_id"] = write_id  # the write this manifest commits (its shards carry it unless plain)
    return manifest


def validate_manifest(manifest: Any, url: str) -> dict[str, Any]:
    """Check the fields readers rely on; raise ManifestError naming the URL and the field."""
    where = f"manifest.json at {url}"
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION} "
            "(rewrite the dataset with this version of data_shards)"
        )
    if manifest.get("kind") not in KINDS:
        raise ManifestError(f"{where}: 'kind' must be one of {list(KINDS)}, got {manifest.get('kind')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ManifestError(f"{where}: 'shards' must be a list")
    for i, shard in enumerate(shards):
        missing = [k for k in ("name", "samples", "frames", "bytes", "sha256") if k not in shard]
        if missing:
            raise ManifestError(f"{where}: shards[{i}] lacks {missing}")
        if "/" in shard["name"] or shard["name"].startswith("."):
            raise ManifestError(f"{where}: shards[{i}].name {shard['name']!r} must be a plain file name")
    return manifest
