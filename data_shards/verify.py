"""Check a shard dataset against its manifest: sizes, checksums, sample counts and sample contents.

One streaming pass per shard: the bytes are hashed while the tar is parsed (:class:`data_shards.read.HashedStream`,
the same hashing the training reader does with ``data.verify_sha256``), so a 1 GB shard is read once. A shard whose
sha256 differs from the manifest's is reported whatever its samples look like: it is not the shard the manifest
describes (overwritten by another writer, or corrupted), and the fix is to re-write the dataset.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_shards import store
from data_shards.read import HashedStream, iter_tar_samples, read_manifest


@dataclass
class Problem:
    shard: str
    sample: str | None
    reason: str

    def __str__(self) -> str:
        where = self.shard + (f" sample {self.sample}" if self.sample else "")
        return f"{where}: {self.reason}"


@dataclass
class VerifyReport:
    url: str
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return sorted({p.shard for p in self.problems})

    def summary(self) -> str:
        head = (
            f"{self.url}: {self.shards_checked} shards, {self.samples_checked} samples checked, "
            f"{len(self.problems)} problems in {len(self.bad_shards)} shards"
        )
        return "\n".join([head, *(f"  BAD {p}" for p in self.problems)])


def _decodes(jpeg: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            if image.format != "JPEG":
                return f"not a JPEG ({image.format})"
            image.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure is the finding
        return f"JPEG does not decode ({type(err).__name__}: {err})"
    return None


def _shape(value: Any) -> tuple[int, ...] | None:
    """Shape of a nested list of numbers (or a numeric array), or None if ragged/non-numeric."""
    if isinstance(value, np.ndarray):
        return tuple(value.shape) if value.dtype.kind in "fiu" else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ()
    if not isinstance(value, list) or not value:
        return (0,) if value == [] else None
    inner = {_shape(v) for v in value}
    if len(inner) != 1 or None in inner:
        return None
    return (len(value), *inner.pop())


def check_sample(sample: dict[str, Any], kind: str) -> list[str]:
    """Problems with one parsed sample (empty list if fine)."""
    problems = []
    meta = sample["meta"]
    jpegs = sample["frames"] if kind == "clips" else [sample.get("jpeg")]
    if kind == "clips" and "frames" not in sample:
        return ["a clips dataset holds a sample without numbered frames"]
    if kind == "frames" and "jpeg" not in sample:
        return ["a frames dataset holds a sample without 'jpg'"]
    for i, jpeg in enumerate(jpegs):
        error = _decodes(jpeg)
        if error:
            name = f"{sample['frame_indices'][i]:04d}.jpg" if kind == "clips" else "jpg"
            problems.append(f"{name}: {error}")
    landmarks = meta.get("landmarks")
    if kind == "clips":
        expected = (len(jpegs), 68, 2)
        if meta.get("frame_indices") is not None and list(meta["frame_indices"]) != sample["frame_indices"]:
            problems.append(
                f"json frame_indices {meta['frame_indices']} do not match the stored frames {sample['frame_indices']}"
            )
    else:
        expected = (68, 2)
    if landmarks is not None and _shape(landmarks) != expected:
        problems.append(f"landmarks shape {_shape(landmarks)} != expected {expected}")
    return problems


def verify_shard(shard_url: str, entry: dict[str, Any], kind: str, report: VerifyReport) -> None:
    name = entry["name"]

    def record(reason: str, detail: str) -> None:
        report.problems.append(Problem(name, None, f"{reason}: {detail}"))

    samples = frames = 0
    try:
        with store.open_url(shard_url, "rb") as raw:
            reader = HashedStream(raw)
            for sample in iter_tar_samples(reader, name, record):
                samples += 1
                frames += len(sample.get("frames", [])) if kind == "clips" else 1
                for problem in check_sample(sample, kind):
                    report.problems.append(Problem(name, sample["key"], problem))
            reader.drain()
    except FileNotFoundError:
        report.problems.append(Problem(name, None, "listed in the manifest but missing"))
        return
    report.samples_checked += samples
    if reader.size != entry["bytes"]:
        report.problems.append(Problem(name, None, f"size {reader.size} bytes != manifest {entry['bytes']}"))
    if reader.hexdigest() != entry["sha256"]:
        report.problems.append(
            Problem(
                name,
                None,
                "sha256 does not match the manifest (corrupted or replaced by another writer): re-write the "
                "dataset",
            )
        )
    if samples != entry["samples"]:
        report.problems.append(
            Problem(name, None, f"{samples} readable samples != manifest {entry['samples']}")
        )
    if frames != entry["frames"]:
        report.problems.append(Problem(name, None, f"{frames} frames != manifest {entry['frames']}"))


def verify(url: str) -> VerifyReport:
    """Check every shard of the dataset at ``url``; the report lists each bad shard and sample."""
    manifest = read_manifest(url)
    report = VerifyReport(url=url)
    for entry in manifest["shards"]:
        verify_shard(store.join(url, entry["name"]), entry, manifest["kind"], report)
        report.shards_checked += 1
    totals = manifest.get("totals", {})
    if totals.get("samples") not in (None, sum(s["samples"] for s in manifest["shards"])):
        report.problems.append(Problem("manifest.json", None, "totals.samples != sum of shard samples"))
    return report
