"""Shards written by other tools read the same: GNU tar, Python's tarfile, webdataset.TarWriter, our writer.

Members are grouped by WebDataset's rule (key = path up to the first dot of the file name, extension
lower-cased), ``./`` prefixes and dots in folder names included; a sample with two members of one name is
counted as a bad sample, as WebDataset refuses it.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from data_shards.read import SkipCounter, iter_samples, iter_tar_samples
from data_shards.write import ShardWriter

FOLDER = "set.v2"  # a dot in a folder name must not split the key


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for clip in ("c0", "c1"):
        for frame in range(3):
            ext = "JPG" if frame == 2 else "jpg"  # cameras write upper case
            files[f"{clip}.{frame:04d}.{ext}"] = rng.bytes(64)
        files[f"{clip}.json"] = json.dumps({"clip_id": clip, "identity_id": "p"}).encode()
        buffer = io.BytesIO()
        np.save(buffer, rng.random((3, 68, 2)).astype(np.float32))
        files[f"{clip}.landmarks.npy"] = buffer.getvalue()
    return files


def _summary(path, prefix: str = "") -> list[tuple]:
    skips = SkipCounter()
    samples = list(iter_samples(str(path), skips))
    assert skips.as_dict() == {}, skips.as_dict()
    return [
        (
            s["key"].removeprefix(prefix),
            s["frame_indices"],
            [bytes(f) for f in s["frames"]],
            s["meta"]["clip_id"],
            np.asarray(s["meta"]["landmarks"]).tobytes(),
        )
        for s in samples
    ]


@pytest.fixture
def expected():
    files = _files()
    out = []
    for clip in ("c0", "c1"):
        frames = [files[k] for k in sorted(files) if k.startswith(clip) and k.lower().endswith(".jpg")]
        landmarks = np.load(io.BytesIO(files[f"{clip}.landmarks.npy"]))
        out.append((clip, [0, 1, 2], frames, clip, landmarks.tobytes()))
    return out


def test_gnu_tar_of_a_folder_with_dot_slash_members(tmp_path, expected):
    if not shutil.which("tar"):
        pytest.fail("GNU tar is needed for this test")
    folder = tmp_path / "src" / FOLDER
    folder.mkdir(parents=True)
    for name, data in sorted(_files().items()):
        (folder / name).write_bytes(data)
    shard = tmp_path / "gnu.tar"
    # the usual packing, `tar -C dir -cf x.tar .`: members ./set.v2/c0.json ... (sorted so a sample's members
    # are consecutive, as WebDataset requires)
    subprocess.run(["tar", "--sort=name", "-C", str(tmp_path / "src"), "-cf", str(shard), "."], check=True)
    with tarfile.open(shard) as packed:
        assert "./set.v2/c0.json" in packed.getnames()
    assert _summary(shard, f"{FOLDER}/") == expected


def test_python_tarfile_and_webdataset_tarwriter(tmp_path, expected):
    from webdataset import TarWriter

    files = _files()
    plain = tmp_path / "tarfile.tar"
    with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _summary(plain, f"{FOLDER}/") == expected

    written = tmp_path / "wds.tar"
    with TarWriter(str(written)) as sink:
        for clip in ("c0", "c1"):
            sample = {"__key__": f"{FOLDER}/{clip}"}
            sample.update({k.split(".", 1)[1]: v for k, v in files.items() if k.startswith(clip + ".")})
            sink.write(sample)
    assert _summary(written, f"{FOLDER}/") == expected


def test_project_writer_reads_the_same(tmp_path, expected):
    files = _files()
    url = str(tmp_path / "ours")
    with ShardWriter(url, "clips", "pretrain", {}) as writer:
        for clip in ("c0", "c1"):
            jpegs = [files[k] for k in sorted(files) if k.startswith(clip) and k.lower().endswith(".jpg")]
            meta = json.loads(files[f"{clip}.json"])
            meta["landmarks"] = np.load(io.BytesIO(files[f"{clip}.landmarks.npy"])).tolist()
            meta["frame_indices"] = [0, 1, 2]
            writer.write(clip, jpegs, meta)
    got = _summary(tmp_path / "ours" / "shard-000000.tar")
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.frombuffer(g[4], np.float32), np.frombuffer(e[4], np.float32))


def test_duplicate_members_are_a_counted_bad_sample():
    files = _files()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in [*sorted(files.items())[:5], ("c0.json", b"{}"), *sorted(files.items())[5:]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skips = SkipCounter()
    keys = [s["key"] for s in iter_tar_samples(io.BytesIO(raw.getvalue()), "dup.tar", skips)]
    assert keys == ["c1"] and skips.as_dict() == {"duplicate_member": 1}
