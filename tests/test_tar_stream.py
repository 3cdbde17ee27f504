"""data_shards/tar_stream.py against tarfile on archives from several writers, and its strict end checks."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from data_shards.tar_stream import TarFormatError, TruncatedMember, iter_members

FILES = [
    ("a.0000.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("a.json", b'{"k": 1}'),
    ("a.landmarks.npy", b"\x93NUMPY" + b"x" * 700),
    ("b.jpg", b""),  # empty member
    ("d" * 120 + "/" + "long" * 20 + ".json", b"{}"),  # > 100 chars: a PAX/GNU long name, or a ustar prefix
]


def _tar(fmt: int, mode: str = "w", float_mtime: bool = False, with_dir: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=fmt) as tar:
        if with_dir:
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in FILES:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5e9 + 0.25 if float_mtime else 1_500_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize(
    "fmt, mode, float_mtime",
    [
        (tarfile.USTAR_FORMAT, "w", False),
        (tarfile.GNU_FORMAT, "w", False),
        (tarfile.PAX_FORMAT, "w", True),  # a PAX header per member, as webdataset's TarWriter writes
        (tarfile.PAX_FORMAT, "w:gz", False),
        (tarfile.GNU_FORMAT, "w:bz2", False),  # tarfile fallback
    ],
)
def test_members_match_tarfile(fmt, mode, float_mtime):
    raw = _tar(fmt, mode, float_mtime)
    ours = list(iter_members(io.BytesIO(raw)))
    assert ours == _reference(raw) == FILES


def test_webdataset_writer_archives_read_the_same():
    from webdataset import TarWriter

    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as tar:
        tar.write({"__key__": "k1", "json": b"{}", "0000.jpg": b"\xff\xd8abc"})
        tar.write({"__key__": "k2", "json": b"[]"})
    raw = buffer.getvalue()
    assert list(iter_members(io.BytesIO(raw))) == _reference(raw)


def test_cut_between_members_is_detected():
    raw = _tar(tarfile.USTAR_FORMAT, with_dir=False)
    second_header = 512 + 512 * -(-len(FILES[0][1]) // 512)
    cut = raw[:second_header]  # exactly after the first member: tarfile sees a clean end
    assert [n for n, _ in _reference(cut)] == [FILES[0][0]]
    reader = iter_members(io.BytesIO(cut))
    assert next(reader) == FILES[0]
    with pytest.raises(EOFError, match="end-of-archive"):
        next(reader)


def test_cut_inside_a_payload_names_the_member():
    raw = _tar(tarfile.USTAR_FORMAT, with_dir=False)
    with pytest.raises(TruncatedMember) as info:
        list(iter_members(io.BytesIO(raw[:700])))
    assert info.value.name == FILES[0][0]


def test_garbage_and_corrupted_headers_are_format_errors():
    with pytest.raises(TarFormatError, match="checksum|number field"):
        list(iter_members(io.BytesIO(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())))
    raw = bytearray(_tar(tarfile.USTAR_FORMAT, with_dir=False))
    raw[10] ^= 0xFF  # a byte of the first member's name: the checksum no longer matches
    with pytest.raises(TarFormatError):
        list(iter_members(io.BytesIO(bytes(raw))))


def test_empty_archive_and_empty_file():
    assert list(iter_members(io.BytesIO(bytes(1024)))) == []
    with pytest.raises(EOFError):
        list(iter_members(io.BytesIO(b"")))
