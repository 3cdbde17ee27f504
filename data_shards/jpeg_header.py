"""A JPEG's declared size, read from its header without decoding: decompression bombs are refused up front.

A 629-byte JPEG can declare 8000 x 8000 pixels (a 192 MB RGB decode, 2 GB peak in some decoders); at 20000 x
20000 PIL raises ``DecompressionBombError``. Every decoder in the project (the batched torch/DALI pipelines,
the torchvision pipeline, evaluation, ``verify``) first asks :func:`check_jpeg` whether the declared size is
sane for what it expects, and skips (and counts) the image otherwise.
"""

from __future__ import annotations

# Start-of-frame markers carry the size: SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn stand alone
MAX_HEADER_SCAN = 1 << 20  # markers before the frame header (EXIF, ICC) rarely exceed a few hundred KB


class BadJpeg(ValueError):
    """The bytes are not a JPEG whose declared size can be trusted; the message says why."""


def jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(width, height) declared by the first start-of-frame segment; BadJpeg if there is none."""
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise BadJpeg("no JPEG start-of-image marker")
    pos, end = 2, min(len(view), MAX_HEADER_SCAN)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            raise BadJpeg(f"expected a marker at byte {pos}")
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        length = (view[pos + 2] << 8) | view[pos + 3]
        if length < 2:
            raise BadJpeg(f"segment length {length} at byte {pos}")
        if marker in _SOF:
            if pos + 9 > len(view):
                break
            height = (view[pos + 5] << 8) | view[pos + 6]
            width = (view[pos + 7] << 8) | view[pos + 8]
            return width, height
        pos += 2 + length
    raise BadJpeg("no frame header (start-of-frame) before the image data")


def check_jpeg(data: bytes | bytearray | memoryview, max_side: int) -> tuple[int, int]:
    """The declared (width, height) if both are in 1..max_side; BadJpeg otherwise (nothing is decoded)."""
    width, height = jpeg_size(data)
    if not (0 < width <= max_side and 0 < height <= max_side):
        raise BadJpeg(
            f"declares {width} x {height} pixels, over the {max_side}-pixel limit (a decompression bomb?)"
        )
    return width, height


def max_side_for(expected: int | None) -> int:
    """The largest side accepted when ``expected``-pixel images are wanted: generous, but far from a bomb."""
    return max(4096, 8 * int(expected or 0))
