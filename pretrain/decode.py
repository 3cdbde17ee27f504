"""Batched JPEG decode: lists of JPEG bytes -> one uint8 tensor (N, 3, H, W).

``device="cuda"`` decodes the whole list with nvjpeg in one call; otherwise libjpeg on the CPU. A corrupt JPEG, or
one whose header declares a size far beyond the expected one (a decompression bomb; checked before decoding,
:mod:`data_shards.jpeg_header`), raises :class:`CorruptImage` carrying its index so the caller can drop it, count it and retry;
:func:`decode_jpegs_skipping` does exactly that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from data_shards.jpeg_header import BadJpeg, check_jpeg, max_side_for


class CorruptImage(ValueError):
    """JPEG number ``index`` of the list could not be decoded."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"JPEG at index {index} could not be decoded: {reason}")
        self.index = index
        self.reason = reason


def _as_byte_tensor(data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    # frombuffer shares memory with the bytes object; decode_jpeg only reads it.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_one(raw: torch.Tensor, index: int, device: str) -> torch.Tensor:
    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError) as err:
        raise CorruptImage(index, str(err).splitlines()[0] if str(err) else type(err).__name__) from err


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size), antialiased bilinear. On the CPU in uint8 (torch's vectorised
    uint8 kernel: a third of the float round trip's time, within one grey level of it); CUDA has no uint8
    antialias kernel, so there it goes through float."""
    if image.device.type == "cpu":
        return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def decode_jpegs(
    jpegs: list[bytes] | list[torch.Tensor], device: str | torch.device = "cpu", size: int | None = None
) -> torch.Tensor:
    """Decode ``jpegs`` to uint8 (N, 3, H, W) on ``device``.

    All images must share one size unless ``size`` is given, in which case every image is resized
    (antialiased bilinear) to ``size`` x ``size``. Raises :class:`CorruptImage` for the first bad JPEG.
    """
    if not jpegs:
        raise ValueError("decode_jpegs: empty list of JPEGs")
    device = torch.device(device)
    limit = max_side_for(size)
    for i, jpeg in enumerate(jpegs):  # declared size first: a bomb is refused before any decoder sees it
        try:
            check_jpeg(jpeg.numpy() if isinstance(jpeg, torch.Tensor) else jpeg, limit)
        except BadJpeg as err:
            raise CorruptImage(i, str(err)) from err
    raws = [_as_byte_tensor(j) for j in jpegs]
    if device.type == "cuda":
        try:
            images = decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):
            # The batched nvjpeg call does not say which image failed: find it one by one.
            images = [_decode_one(r, i, str(device)) for i, r in enumerate(raws)]
    else:
        images = [_decode_one(r, i, "cpu") for i, r in enumerate(raws)]
    shapes = {tuple(im.shape) for im in images}
    if size is not None:
        images = [im if im.shape[-2:] == (size, size) else _resize(im, size) for im in images]
    elif len(shapes) > 1:
        raise ValueError(
            f"decode_jpegs: images have different sizes {sorted(shapes)}; pass size=... to resize them"
        )
    return torch.stack(images)


def decode_jpegs_skipping(
    jpegs: list[bytes] | list[torch.Tensor], device: str | torch.device = "cpu", size: int | None = None
) -> tuple[torch.Tensor | None, list[int]]:
    """Like :func:`decode_jpegs` but drops corrupt JPEGs; returns (images of the good ones, bad indices)."""
    good = list(range(len(jpegs)))
    bad: list[int] = []
    while good:
        try:
            return decode_jpegs([jpegs[i] for i in good], device, size), sorted(bad)
        except CorruptImage as err:
            bad.append(good.pop(err.index))
    return None, sorted(bad)
