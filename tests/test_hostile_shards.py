"""Hostile shards never stop a reader: each attack is skipped and counted, with memory bounded.

Every case here once escaped the reader (ValueError, MemoryError, RecursionError, OverflowError); the fuzz test
feeds 1,000 seeded mutations of a real shard through it.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest

from data_shards.read import SkipCounter, iter_tar_samples
from data_shards.tar_stream import MAX_MEMBER_BYTES

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 60 + b"\xff\xd9"  # the reader does not decode: any bytes do
LANDMARKS = np.zeros((2, 68, 2), np.float32)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def clip(key: str, meta: bytes | None = None, landmarks: bytes | None = None) -> bytes:
    meta = (
        meta if meta is not None else json.dumps({"clip_id": key, "identity_id": "p", "fps": 25 / 6}).encode()
    )
    landmarks = landmarks if landmarks is not None else npy(LANDMARKS)
    return b"".join(
        [
            member(f"{key}.0.jpg", JPEG),
            member(f"{key}.1.jpg", JPEG),
            member(f"{key}.json", meta),
            member(f"{key}.landmarks.npy", landmarks),
        ]
    )


def archive(*parts: bytes) -> bytes:
    return b"".join(parts) + b"\0" * 1024


def read(data: bytes) -> tuple[list[str], dict[str, int]]:
    skips = SkipCounter()
    keys = [sample["key"] for sample in iter_tar_samples(io.BytesIO(data), "test.tar", skips)]
    return keys, skips.as_dict()


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        line = f" {key}={value}\n".encode()
        length = len(line) + 1
        length = len(str(length + len(str(length)) - 1).encode()) + len(line)
        body += str(length).encode() + line
    return member("././@PaxHeader", body, tarfile.XHDTYPE)


def test_a_zero_block_inside_the_archive_is_not_a_silent_end():
    keys, skips = read(archive(clip("a"), clip("b"), b"\0" * 512, clip("c")))
    assert keys == ["a"] and skips == {"truncated_tar": 1}


def test_well_formed_clips_read():
    keys, skips = read(archive(clip("a"), clip("b")))
    assert keys == ["a", "b"] and skips == {}


def test_pax_size_that_is_not_a_number_ends_the_shard_counted():
    """The sample being assembled when the archive breaks may be incomplete: dropped, the shard counted."""
    keys, skips = read(
        archive(clip("a"), clip("b"), pax({"size": "abc"}), member("c.json", b"{}"), clip("d"))
    )
    assert keys == ["a"] and skips == {"truncated_tar": 1}


def test_member_declaring_a_huge_size_is_refused_before_reading():
    header = bytearray(tarfile.TarInfo("b.0.jpg").tobuf(format=tarfile.GNU_FORMAT))
    header[124:136] = b"\x80" + (1 << 60).to_bytes(11, "big")  # base-256 size: 2^60 bytes
    header[148:156] = b"        "
    header[148:155] = f"{sum(header):06o}\0".encode()
    tracemalloc.start()
    keys, skips = read(archive(clip("a"), clip("b"), bytes(header)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["a"] and skips == {"truncated_tar": 1}
    assert peak < 8 << 20


def test_json_nested_200000_deep_is_a_bad_json():
    keys, skips = read(archive(clip("a", meta=b"[" * 200_000 + b"]" * 200_000), clip("b")))
    assert keys == ["b"] and skips == {"bad_json": 1}


def test_5000_digit_frame_name_does_not_crash():
    huge = "9" * 5000
    info = tarfile.TarInfo(f"a.{huge}.jpg")
    info.size = len(JPEG)
    long_member = info.tobuf(format=tarfile.GNU_FORMAT) + JPEG + b"\0" * (-len(JPEG) % 512)
    data = archive(long_member, member("a.json", b"{}"), clip("b"))
    keys, skips = read(data)
    assert keys == ["b"] and skips == {"missing_jpeg": 1}


def test_npy_header_claiming_10_to_the_12_frames_is_refused_unallocated():
    forged = npy(LANDMARKS).replace(b"(2, 68, 2)", b"(1000000000000, 68, 2)")
    tracemalloc.start()
    keys, skips = read(archive(clip("a", landmarks=forged), clip("b")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["b"] and skips == {"bad_landmarks": 1}
    assert peak < 8 << 20


def test_object_npy_is_refused_without_unpickling():
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    keys, skips = read(archive(clip("a", landmarks=pickled.getvalue()), clip("b")))
    assert keys == ["b"] and skips == {"bad_landmarks": 1}


def test_gzip_bomb_is_bounded():
    """A 100 MiB member of zeros compresses to ~100 KB; the reader refuses it by its declared size."""
    size = MAX_MEMBER_BYTES + (36 << 20)
    info = tarfile.TarInfo("b.0.jpg")
    info.size = size
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as packed:
        packed.write(clip("a") + clip("b"))
        packed.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        zeros = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            packed.write(zeros)
        packed.write(b"\0" * 1024)
    assert len(raw.getvalue()) < 1 << 20
    tracemalloc.start()
    keys, skips = read(raw.getvalue())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["a"] and skips == {"truncated_tar": 1}
    assert peak < 8 << 20


# ---- fuzz: seeded mutations of a real shard ----

FUZZ_CASES = 1000
FUZZ_PEAK_BYTES = 32 << 20  # the stated bound for these ~10 KB shards; the reader's own caps bound any shard


def _mutations(base: bytes, rng: np.random.Generator):
    """Yield (name, mutated bytes): byte flips, truncations, header field edits, PAX, gzip, JSON/npy edits."""
    headers = [i for i in range(0, len(base) - 512, 512) if base[i + 257 : i + 262] == b"ustar"]
    kinds = ["flip", "truncate", "size", "checksum", "name", "pax", "gzip", "json", "npy", "zero_block"]
    for case in range(FUZZ_CASES):
        kind = kinds[case % len(kinds)]
        data = bytearray(base)
        if kind == "flip":
            for _ in range(int(rng.integers(1, 16))):
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        elif kind == "truncate":
            data = data[: int(rng.integers(len(data)))]
        elif kind == "size":
            h = int(rng.choice(headers))
            data[h + 124 : h + 136] = bytes(rng.choice(list(b"0123456789abc \0\x80\xff"), 12).tolist())
        elif kind == "checksum":
            h = int(rng.choice(headers))
            data[h + 148 : h + 156] = bytes(rng.integers(0, 256, 8, dtype=np.uint8).tolist())
        elif kind == "name":
            h = int(rng.choice(headers))
            data[h : h + 100] = bytes(rng.choice(list(b"abc.0123456789/\0."), 100).tolist())
        elif kind == "pax":
            value = rng.choice(["abc", "-1", "9" * 30, str(1 << 62), "", "1e9", "12"])
            data = bytearray(pax({"size": str(value)}) + bytes(data))
        elif kind == "gzip":
            packed = bytearray(gzip.compress(bytes(data)))
            cut = int(rng.integers(10, len(packed)))
            packed[cut] ^= 0xFF
            data = packed[: int(rng.integers(cut, len(packed) + 1))]
        elif kind == "json":
            at = data.find(b'{"clip_id"')
            junk = rng.choice([b'{"fps": NaN', b"[" * 5000, b"\xff\xfe", b'"x"', b"1e400", b"{}" * 3])
            data[at : at + len(junk)] = junk
        elif kind == "npy":
            at = data.find(b"\x93NUMPY")
            edit = int(rng.integers(0, 80))
            data[at + edit] = int(rng.integers(0, 256))
        elif kind == "zero_block":
            h = int(rng.choice(headers))
            data[h : h + 512] = b"\0" * 512
        yield kind, bytes(data)


@pytest.mark.fuzz
def test_fuzz_1000_mutated_shards_no_uncaught_exception_and_nothing_silently_lost():
    base = archive(*(clip(f"c{i}") for i in range(4)))
    rng = np.random.default_rng(20261205)
    by_kind: dict[str, int] = {}
    tracemalloc.start()
    for kind, data in _mutations(base, rng):
        keys, skips = read(data)  # must not raise
        counted = sum(skips.values())
        # every original sample is either read or the shard says something was skipped
        assert len(keys) == 4 or counted > 0, (kind, keys, skips)
        by_kind[kind] = by_kind.get(kind, 0) + 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(by_kind.values()) == FUZZ_CASES
    assert peak < FUZZ_PEAK_BYTES, peak
    print(
        f"\nfuzz: {FUZZ_CASES} mutated shards ({by_kind}), 0 uncaught exceptions, peak {peak / 2**20:.1f} MiB"
    )


# ---- JPEG bombs and hostile JSON fields past the reader ----


def _bomb(width: int, height: int) -> bytes:
    """A tiny valid-looking JPEG whose frame header declares width x height."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_jpeg_header_size_is_read_without_decoding():
    from data_shards.jpeg_header import BadJpeg, check_jpeg, jpeg_size

    assert jpeg_size(_bomb(8000, 8000)) == (8000, 8000)
    with pytest.raises(BadJpeg, match="8000 x 8000"):
        check_jpeg(_bomb(8000, 8000), 4096)
    with pytest.raises(BadJpeg, match="start-of-image"):
        jpeg_size(b"GIF89a" + b"\0" * 64)
    assert check_jpeg(_bomb(8, 8), 64) == (8, 8)


def test_batched_decode_refuses_a_bomb_before_decoding():
    from pretrain.decode import decode_jpegs_skipping

    tracemalloc.start()
    images, bad = decode_jpegs_skipping([_bomb(8, 8), _bomb(8000, 8000), _bomb(20000, 20000)], "cpu", 8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert bad == [1, 2] and images.shape == (1, 3, 8, 8)
    assert peak < 8 << 20


def test_evaluation_leaves_out_bad_jpegs_and_hostile_labels(tmp_path):
    from data_shards.write import ShardWriter
    from eval.data import load_frames
    from eval.features import decode_batch

    url = str(tmp_path / "eval")
    with ShardWriter(url, "frames", "eval", {}) as writer:
        writer.write("ok", _bomb(8, 8), {"identity_id": "p", "expression": 3, "valence": 0.5})
        writer.write("bomb", _bomb(20000, 20000), {"identity_id": "p", "expression": 1})
        writer.write("junk", b"\xff\xd8not a jpeg", {"identity_id": "p"})
        writer.write("labels", _bomb(8, 8), {"identity_id": ["x"], "expression": "abc", "valence": 1e400})
    data = load_frames(url)
    assert data.keys == ["ok", "labels"] and data.skipped == {"corrupt_jpeg": 2}
    assert list(data.expression) == [3, -1] and list(data.identity) == ["p", ""]
    assert np.isnan(data.valence[1])
    assert decode_batch([b"\xff\xd8broken"], 8, 8).shape == (1, 3, 8, 8)  # grey stand-in, no exception


@pytest.mark.parametrize(
    "meta, reason",
    [
        ({"fps": float("inf")}, "bad_fps"),
        ({"fps": float("nan")}, "bad_fps"),
        ({"fps": "abc"}, "bad_fps"),
        ({"size": "abc"}, "bad_size"),
        ({"size": [1]}, "bad_size"),
        ({"size": 1}, "bad_size"),
        ({"size": 64.5}, "bad_size"),
        ({}, None),
    ],
)
def test_clip_json_fields_are_type_and_range_checked(meta, reason):
    from pretrain.pipelines.clips import validate_landmarks

    assert validate_landmarks({"landmarks": np.zeros((2, 68, 2)), **meta}, 2) == reason
