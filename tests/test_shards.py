"""ShardWriter / read / verify: roundtrips (local and the real SeaweedFS), commit point, corruption."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from data_shards import store
from data_shards.manifest import ManifestError
from data_shards.read import SkipCounter, iter_samples, iter_tar_samples, read_manifest, shard_urls
from data_shards.verify import verify
from data_shards.write import ShardWriter, encode_jpeg

SIZE = 16


@dataclass
class FakeClip:
    key: str
    frames: list[np.ndarray]
    meta: dict = field(default_factory=dict)


def make_clip(i: int, indices: list[int], rng: np.random.Generator) -> FakeClip:
    frames = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in indices]
    landmarks = rng.uniform(0, SIZE, (len(indices), 68, 2)).round(2).tolist()
    meta = {
        "clip_id": f"fake-i{i // 2:05d}-c{i % 2:03d}",
        "identity_id": f"fake-i{i // 2:05d}",
        "fps": 25 / 6,
        "size": SIZE,
        "source": "synth",
        "frame_indices": indices,
        "landmarks": landmarks,
        "labels": None,
    }
    return FakeClip(meta["clip_id"], frames, meta)


def write_clips(url: str, n: int = 5, max_samples: int = 2, indices=(0, 5, 10, 10000)) -> list[FakeClip]:
    rng = np.random.default_rng(0)
    clips = [make_clip(i, list(indices), rng) for i in range(n)]
    with ShardWriter(url, "clips", "pretrain", {"seed": 0}, max_samples=max_samples) as writer:
        for clip in clips:
            writer.write_clip(clip)
        writer.skip("too_short", "a clip with 1 frame")
    return clips


def check_roundtrip(url: str, clips: list[FakeClip]) -> None:
    manifest = read_manifest(url)
    assert manifest["kind"] == "clips" and manifest["split"] == "pretrain"
    assert manifest["generator"] == {"seed": 0}
    assert manifest["skipped"] == {"too_short": 1}
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["totals"] == {
        "shards": 3,
        "samples": 5,
        "frames": 20,
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "identities": 3,
    }
    for entry, shard_url in zip(manifest["shards"], shard_urls(url)):
        data = store.read_bytes(shard_url)
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    samples = [s for u in shard_urls(url) for s in iter_samples(u)]
    assert [s["key"] for s in samples] == [c.key for c in clips]
    first = samples[0]
    meta = dict(first["meta"])
    landmarks = meta.pop("landmarks")  # stored as landmarks.npy: float32 (T, 68, 2), not JSON
    assert isinstance(landmarks, np.ndarray) and landmarks.dtype == np.float32
    np.testing.assert_array_equal(landmarks, np.asarray(clips[0].meta["landmarks"], np.float32))
    expected = {k: v for k, v in clips[0].meta.items() if k != "landmarks"}
    assert meta == json.loads(json.dumps(expected))
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(shard_urls(url)[0]))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert f"{clips[0].key}.landmarks.npy" in names and f"{clips[0].key}.json" in names
    assert all(not m.pax_headers for m in members)  # plain ustar headers: half the headers to parse
    assert first["frame_indices"] == [0, 5, 10, 10000]  # numeric order, not "10000" < "5"
    assert len(first["frames"]) == 4 and all(f[:2] == b"\xff\xd8" for f in first["frames"])
    assert verify(url).ok


def test_clips_roundtrip_local(tmp_path):
    url = str(tmp_path / "ds")
    clips = write_clips(url)
    check_roundtrip(url, clips)
    assert sorted(p.name for p in Path(url).iterdir() if p.suffix != ".idx")[-1] == "shard-000002.tar"


def test_clips_roundtrip_on_real_store(s3_env):
    url = s3_env.url("test-shards/roundtrip")
    clips = write_clips(url)
    check_roundtrip(url, clips)
    assert [n for n in store.list_dir(url) if not n.endswith(".idx")] == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    # A rewrite gets its own shard names, commits, then removes the version it replaced.
    again = write_clips(url)
    write_id = read_manifest(url)["write_id"]
    check_roundtrip(url, again)
    assert [n for n in store.list_dir(url) if not n.endswith(".idx")] == [
        "manifest.json",
        *(f"shard-{write_id}-{i:06d}.tar" for i in range(3)),
    ]


def test_frames_roundtrip_and_byte_limit(tmp_path):
    url = str(tmp_path / "frames")
    rng = np.random.default_rng(1)
    with ShardWriter(url, "frames", "eval", {}, max_samples=100, max_bytes=4000) as writer:
        for i in range(6):
            meta = {"identity_id": None, "expression": i % 8, "landmarks": None, "split": "test"}
            writer.write(f"f{i}", encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)), meta)
    manifest = read_manifest(url)
    # One sample takes ~2.5 KB of tar members, so a 4000-byte limit gives one sample per shard
    # (tar's end-of-archive record pads each file to a multiple of 10 KiB on top of the limit).
    assert manifest["totals"]["samples"] == 6 and manifest["totals"]["shards"] == 6
    samples = [s for u in shard_urls(url) for s in iter_samples(u)]
    assert [s["meta"]["expression"] for s in samples] == [0, 1, 2, 3, 4, 5]
    assert "jpeg" in samples[0] and "frames" not in samples[0]


def test_crash_mid_write_leaves_no_manifest_and_removes_its_shards(tmp_path):
    url = str(tmp_path / "crashed")
    rng = np.random.default_rng(2)
    with pytest.raises(RuntimeError, match="generator died"):
        with ShardWriter(url, "clips", "pretrain", {}, max_samples=1) as writer:
            writer.write_clip(make_clip(0, [0, 1], rng))
            writer.write_clip(make_clip(1, [0, 1], rng))  # publishes shard 0
            assert (Path(url) / "shard-000000.tar").stat().st_size > 0
            raise RuntimeError("generator died")
    assert not (Path(url) / "manifest.json").exists()
    assert not list(Path(url).glob("shard-*"))  # nothing references them: removed on abort
    with pytest.raises(ManifestError, match="no manifest.json at .*incomplete or the path is wrong"):
        read_manifest(url)


def test_a_failed_rewrite_keeps_the_old_version_committed(tmp_path):
    url = str(tmp_path / "again")
    clips = write_clips(url)
    with pytest.raises(RuntimeError):
        with ShardWriter(url, "clips", "pretrain", {}, max_samples=1) as writer:
            writer.write_clip(make_clip(9, [0, 1], np.random.default_rng(5)))
            writer.write_clip(make_clip(10, [0, 1], np.random.default_rng(6)))  # publishes a shard
            raise RuntimeError("crash")
    check_roundtrip(url, clips)  # the old version: intact, committed, readable
    assert sorted(p.name for p in Path(url).iterdir() if p.suffix != ".idx")[-1] == "shard-000002.tar"


def test_writer_rejects_bad_keys_and_mismatched_frames(tmp_path):
    with ShardWriter(str(tmp_path / "k"), "clips", "pretrain", {}) as writer:
        with pytest.raises(ValueError, match="without '.'"):
            writer.write("a.b", [b"x"], {"frame_indices": [0]})
        with pytest.raises(ValueError, match="frame_indices"):
            writer.write("ab", [b"x", b"y"], {"frame_indices": [0]})
        writer.write("ab", [b"x"], {"frame_indices": [0]})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write("ab", [b"x"], {"frame_indices": [0]})


def shard_path(url: str, index: int = 0) -> Path:
    return Path(url) / f"shard-{index:06d}.tar"


def test_reader_skips_bad_json_and_keeps_a_truncated_tars_complete_samples(tmp_path):
    url = str(tmp_path / "bad")
    rng = np.random.default_rng(3)
    good = encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    with ShardWriter(url, "frames", "eval", {}) as writer:
        for i in range(4):
            writer.write(f"s{i}", good, {"expression": 1})
    path = shard_path(url)
    data = bytearray(path.read_bytes())
    marker = data.find(b'{"expression":1}', data.find(b"s1.json"))
    data[marker : marker + 2] = b"{{"  # s1's JSON no longer parses
    path.write_bytes(bytes(data[: data.find(b"s3.jpg") + 700]))  # cut inside the last sample
    skips = SkipCounter()
    keys = [s["key"] for s in iter_samples(str(path), skips)]
    assert keys == ["s0", "s2"]
    assert skips.as_dict() == {"bad_json": 1, "truncated_tar": 1}


def corrupt_dataset(tmp_path) -> str:
    """Three single-sample shards: 0 fine, 1 with a corrupt JPEG, 2 with wrong landmark shape."""
    url = str(tmp_path / "verify")
    rng = np.random.default_rng(4)
    jpeg = encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ok_marks = np.zeros((2, 68, 2)).tolist()
    with ShardWriter(url, "clips", "pretrain", {}, max_samples=1) as writer:
        writer.write("good", [jpeg, jpeg], {"frame_indices": [0, 1], "landmarks": ok_marks})
        writer.write(
            "badjpeg", [jpeg, b"\xff\xd8 not a jpeg"], {"frame_indices": [0, 1], "landmarks": ok_marks}
        )
        writer.write(
            "badmarks", [jpeg, jpeg], {"frame_indices": [0, 1], "landmarks": np.zeros((3, 68, 2)).tolist()}
        )
        writer.write("fine", [jpeg], {"frame_indices": [7], "landmarks": np.zeros((1, 68, 2)).tolist()})
    return url


def test_verify_names_bad_shards_and_samples(tmp_path):
    url = corrupt_dataset(tmp_path)
    # Flip one byte inside a JPEG payload of shard 0, and truncate shard 3.
    path0 = shard_path(url, 0)
    data = bytearray(path0.read_bytes())
    data[data.find(b"\xff\xd8") + 300] ^= 0xFF
    path0.write_bytes(bytes(data))
    path3 = shard_path(url, 3)
    path3.write_bytes(path3.read_bytes()[:1200])
    report = verify(url)
    text = report.summary()
    assert not report.ok
    assert report.bad_shards == [f"shard-00000{i}.tar" for i in range(4)]
    assert "shard-000000.tar: sha256 does not match" in text
    assert "shard-000001.tar sample badjpeg: 0001.jpg: JPEG does not decode" in text
    assert "shard-000002.tar sample badmarks: landmarks shape (3, 68, 2) != expected (2, 68, 2)" in text
    assert "shard-000003.tar: truncated_tar" in text and "shard-000003.tar: size" in text


def test_verify_cli_exit_codes(tmp_path):
    url = str(tmp_path / "cli")
    write_clips(url, n=2)
    cmd = [sys.executable, "-m", "data_shards", "verify"]
    ok = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    data = bytearray(shard_path(url).read_bytes())
    data[len(data) // 3] ^= 0x01
    shard_path(url).write_bytes(bytes(data))
    bad = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "BAD shard-000000.tar" in bad.stdout
    missing = subprocess.run([*cmd, str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr


def fake_synth_modules(monkeypatch) -> None:
    """Stand-ins for data_shards.synth / .cli (written by another engineer) with the agreed API."""
    import argparse
    import types
    from dataclasses import dataclass as dc

    @dc
    class SynthConfig:
        identities: int = 2
        clips_per_identity: int = 2
        seconds: float = 1.0
        seed: int = 0

    def iter_clips(cfg):
        rng = np.random.default_rng(cfg.seed)
        for i in range(cfg.identities * cfg.clips_per_identity):
            yield make_clip(i, [0, 3, 6], rng)

    def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--identities", type=int, default=2)
        parser.add_argument("--seed", type=int, default=0)

    def config_from_args(args) -> SynthConfig:
        return SynthConfig(identities=args.identities, seed=args.seed)

    synth = types.ModuleType("data_shards.synth")
    synth.SynthConfig, synth.iter_clips = SynthConfig, iter_clips
    cli = types.ModuleType("data_shards.synth.cli")
    cli.add_synth_arguments, cli.config_from_args = add_synth_arguments, config_from_args
    cli.main_contact_sheet = lambda argv: 7 if argv == ["--x"] else 0
    synth.cli = cli
    monkeypatch.setitem(sys.modules, "data_shards.synth", synth)
    monkeypatch.setitem(sys.modules, "data_shards.synth.cli", cli)


def test_synth_command_writes_shards_config_and_summary(tmp_path, monkeypatch, capsys):
    from data_shards.__main__ import main

    fake_synth_modules(monkeypatch)
    out = str(tmp_path / "synth")
    argv = [
        "synth",
        "--identities",
        "3",
        "--seed",
        "5",
        "--out",
        out,
        "--shard-samples",
        "4",
        "--no-progress",
    ]
    assert main(argv) == 0
    manifest = read_manifest(out)
    assert manifest["generator"] == {
        "command": "synth",
        "identities": 3,
        "clips_per_identity": 2,
        "seconds": 1.0,
        "seed": 5,
    }
    assert manifest["totals"]["samples"] == 6 and manifest["totals"]["shards"] == 2
    assert "seed: 5" in (Path(out) / "config.yaml").read_text()
    assert "wrote 6 samples (18 frames, 3 identities) in 2 shards" in capsys.readouterr().out
    assert verify(out).ok
    assert main(["contact-sheet", "--x"]) == 7


def test_cli_store_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from data_shards.__main__ import main

    fake_synth_modules(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["synth", "--out", str(blocker / "ds"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write to local destination")


def _tar(samples: list[dict[str, bytes]]) -> io.BytesIO:
    from webdataset import TarWriter

    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    buffer.seek(0)
    return buffer


def test_landmarks_from_npy_member_json_lists_and_corrupt_npy():
    """landmarks.npy is read as float32; older shards with JSON landmark lists still read; a corrupt .npy skips
    that clip only, counted as bad_landmarks."""
    lm = np.arange(2 * 68 * 2, dtype=np.float32).reshape(2, 68, 2) / 7
    npy = io.BytesIO()
    np.save(npy, lm)
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    frames = {"0000.jpg": jpeg, "0001.jpg": jpeg}
    meta = json.dumps({"clip_id": "c"}).encode()
    old_meta = json.dumps({"clip_id": "c", "landmarks": lm.tolist()}).encode()
    skips = SkipCounter()
    samples = list(
        iter_tar_samples(
            _tar([
                {"__key__": "new", **frames, "json": meta, "landmarks.npy": npy.getvalue()},
                {"__key__": "old", **frames, "json": old_meta},
                {"__key__": "bad", **frames, "json": meta, "landmarks.npy": b"\x93NUMPY garbage"},
            ]),
            "mem.tar",
            skips,
        )
    )  # fmt: skip
    assert [s["key"] for s in samples] == ["new", "old"]
    np.testing.assert_array_equal(samples[0]["meta"]["landmarks"], lm)
    np.testing.assert_allclose(np.asarray(samples[1]["meta"]["landmarks"], np.float32), lm)
    assert skips.as_dict() == {"bad_landmarks": 1}


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i2", "u1"])
@pytest.mark.parametrize("fortran", [False, True])
def test_landmarks_npy_loads_as_numpy_does_from_one_header_parse(dtype, fortran):
    """The reader builds the array from the header it checked: equal to np.load for any byte order and memory
    order, writable, and not a view of the shard's bytes."""
    import io

    from data_shards.read import _load_npy

    array = (np.arange(3 * 68 * 2) % 97).astype(dtype).reshape(3, 68, 2)
    if fortran:
        array = np.asfortranarray(array)
    buffer = io.BytesIO()
    np.save(buffer, array)
    loaded = _load_npy(buffer.getvalue())
    expected = np.load(io.BytesIO(buffer.getvalue()))
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
    np.testing.assert_array_equal(loaded, expected)
    assert loaded.flags.writeable and loaded.flags.owndata
