"""Corrupt input at run level: truncated tar, invalid JPEGs, invalid JSON, missing and wrong-shaped landmarks,
an empty shard. The run must finish and metrics.jsonl must count the skips by reason."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.faults.conftest import metrics, record, run

pytestmark = [pytest.mark.faults, pytest.mark.integration]

EXPECTED_REASONS = ("truncated_tar", "bad_json", "corrupt_jpeg", "missing_landmarks", "bad_landmarks")


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _edit(path: Path, fn) -> None:
    """Rewrite a shard with ``fn(sample_index, ext, data) -> bytes | None`` applied to every member."""
    members, keys = [], []
    for name, data in _members(path):
        key, _, ext = name.partition(".")
        if key not in keys:
            keys.append(key)
        new = fn(keys.index(key), ext, data)
        if new is not None:
            members.append((name, new))
    _write_tar(path, members)


def make_corrupt_dataset(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for path in sorted(src.glob("shard-*.tar")):
        (dest / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    # shard 0: cut in the middle (its complete samples stay usable), exactly at a 512-byte block boundary:
    # the hard case, where tarfile itself sees a clean end
    raw = (dest / "shard-000000.tar").read_bytes()
    (dest / "shard-000000.tar").write_bytes(raw[: len(raw) * 3 // 5 // 512 * 512])
    # shard 1: sample 0 keeps only its first two frames decodable; sample 1's JSON is not JSON
    _edit(
        dest / "shard-000001.tar",
        lambda i, ext, data: (
            b"\xff\xd8 not a jpeg" if i == 0 and ext.endswith("jpg") and ext not in ("0000.jpg", "0001.jpg")
            else b'{"clip_id": ' if i == 1 and ext == "json" else data
        ),
    )  # fmt: skip

    # shard 2: sample 0 has no landmarks, sample 1 has landmarks of the wrong shape (5 points, not 68)
    def landmarks(i, ext, data):
        if ext != "landmarks.npy" or i > 1:
            return data
        if i == 0:
            return None  # member dropped
        buffer = io.BytesIO()
        np.save(buffer, np.load(io.BytesIO(data))[:, :5])
        return buffer.getvalue()

    _edit(dest / "shard-000002.tar", landmarks)
    # an empty shard (no samples at all), listed in the manifest
    _write_tar(dest / "shard-000004.tar", [])
    manifest["shards"].append(
        {"name": "shard-000004.tar", "samples": 0, "frames": 0, "bytes": 0, "sha256": ""}
    )
    for shard in manifest["shards"]:
        data = (dest / shard["name"]).read_bytes()
        shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["totals"]["shards"] = len(manifest["shards"])
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_corrupt_data_is_skipped_and_counted(clips_dir, tmp_path):
    data = make_corrupt_dataset(clips_dir, tmp_path / "corrupt")
    run_dir = tmp_path / "run"
    rc, out = run("python", [f"data.url={data}", f"run_dir={run_dir}", "max_steps=12", "checkpoint_every=0"])
    assert rc == 0, out[-4000:]
    lines = metrics(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert all(m["loss"] == m["loss"] for m in lines)  # finite: bad input never reached the loss
    skipped = lines[-1]["skipped"]
    missing = [reason for reason in EXPECTED_REASONS if not skipped.get(reason)]
    assert not missing, f"skip reasons not counted in metrics.jsonl: {missing}; got {skipped}"
    assert (run_dir / "backbone.pt").exists()
    record("corrupt data (5 kinds + empty shard)", injected=6, skipped=skipped)
