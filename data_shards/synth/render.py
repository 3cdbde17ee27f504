"""Draw a FaceGeometry with PIL (supersampled for antialiasing) and apply the clip's lighting."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from data_shards.synth.geometry import FaceGeometry
from data_shards.synth.identity import Color, Identity

SCLERA = (245, 243, 236)
PUPIL = (12, 10, 10)
MOUTH_INSIDE = (70, 18, 24)
TEETH = (240, 236, 222)
DARK = (45, 25, 20)


def _mix(a: Color, b: Color, t: float) -> Color:
    return (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t), int(a[2] + (b[2] - a[2]) * t))


def _flat(points: np.ndarray) -> list[float]:
    return points.ravel().tolist()


@lru_cache(maxsize=8)
def _light_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    return np.meshgrid(axis, axis)


def _background(ident: Identity, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), ident.background)
    draw = ImageDraw.Draw(img)
    period = max(4, ident.pattern_period * side // 128)
    accent = ident.background_accent
    if ident.background_pattern == "stripes":
        for x in range(-side, side, period * 2):
            draw.polygon([x, 0, x + period, 0, x + period + side, side, x + side, side], fill=accent)
    elif ident.background_pattern == "dots":
        r = period // 3
        for y in range(period // 2, side, period):
            for x in range(period // 2, side, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    elif ident.background_pattern == "checker":
        for y in range(0, side, period):
            for x in range((y // period) % 2 * period, side, 2 * period):
                draw.rectangle([x, y, x + period - 1, y + period - 1], fill=accent)
    elif ident.background_pattern == "gradient":
        t = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
        arr = np.asarray(ident.background, np.float32) * (1 - t) + np.asarray(accent, np.float32) * t
        img = Image.fromarray(np.broadcast_to(arr, (side, side, 3)).astype(np.uint8))
    return img


class FaceRenderer:
    """Renders one identity; the background and colours are prepared once per clip."""

    def __init__(self, ident: Identity, size: int, supersample: int = 2):
        self.ident = ident
        self.size = size
        self.k = supersample
        self.side = size * supersample
        self.background = _background(ident, self.side)
        self.unit = ident.scale * self.side  # one face unit in supersampled pixels
        self.line = max(1, round(self.side / 128))
        skin = ident.skin
        self.colors = {
            "skin": skin,
            "shade": _mix(skin, (0, 0, 0), 0.22),
            "crease": _mix(skin, DARK, 0.55),
            "neck": _mix(skin, (0, 0, 0), 0.15),
            "beard": _mix(ident.hair, skin, 0.25),
        }

    def render(self, geom: FaceGeometry, light: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        img = self.background.copy()
        draw = ImageDraw.Draw(img)
        k, unit, c, ident = self.k, self.unit, self.colors, self.ident
        lm = geom.landmarks * k
        parts = {name: pts * k for name, pts in geom.parts.items()}

        self._body(draw, lm, parts)
        draw.polygon(_flat(parts["head"]), fill=c["skin"])
        if ident.beard:
            draw.polygon(_flat(parts["beard"]), fill=c["beard"])
            draw.polygon(_flat(parts["moustache"]), fill=c["beard"])
        if geom.amounts["cheeks"] > 0.05:
            blush = _mix(c["skin"], (235, 120, 115), 0.3 * geom.amounts["cheeks"])
            r = 0.13 * unit
            for x, y in parts["cheeks"]:
                draw.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=blush)
        self._eyes(draw, lm, parts, geom.iris_radius * k)
        if ident.hair_style != "bald":
            draw.polygon(_flat(parts["hair"]), fill=ident.hair)
        self._brows(draw, lm)
        self._creases(draw, parts, geom.amounts)
        self._nose(draw, lm)
        self._mouth(draw, lm, geom.amounts["mouth_open"])
        if ident.glasses:
            self._glasses(draw, lm, parts)

        if k > 1:
            img = img.reduce(k)
        return self._light(np.asarray(img), light)

    def _body(self, draw: ImageDraw.ImageDraw, lm: np.ndarray, parts: dict[str, np.ndarray]) -> None:
        ident, unit, c = self.ident, self.unit, self.colors
        cx = ident.center[0] * self.side
        top = ident.center[1] * self.side + (ident.chin_y + 0.5) * unit
        bottom = self.side + 4
        draw.polygon(
            [cx - 2.1 * unit, bottom, cx - 1.9 * unit, top + 0.35 * unit, cx - 1.1 * unit, top,
             cx + 1.1 * unit, top, cx + 1.9 * unit, top + 0.35 * unit, cx + 2.1 * unit, bottom],
            fill=ident.clothes,
        )  # fmt: skip
        if "hair_back" in parts:
            draw.polygon(_flat(parts["hair_back"]), fill=ident.hair)
        neck_top = lm[4, 1]
        draw.polygon(
            [cx - 0.42 * unit, neck_top, cx + 0.42 * unit, neck_top, cx + 0.46 * unit, top + 0.12 * unit,
             cx, top + 0.3 * unit, cx - 0.46 * unit, top + 0.12 * unit],
            fill=c["neck"],
        )  # fmt: skip
        draw.polygon(_flat(parts["ear_left"]), fill=c["shade"])
        draw.polygon(_flat(parts["ear_right"]), fill=c["shade"])

    def _eyes(
        self, draw: ImageDraw.ImageDraw, lm: np.ndarray, parts: dict[str, np.ndarray], radius: float
    ) -> None:
        c, line = self.colors, self.line
        for start in (36, 42):
            draw.polygon(_flat(lm[start : start + 6]), fill=SCLERA)
        for x, y in parts["irises"]:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=self.ident.eyes)
            p = radius * 0.45
            draw.ellipse([x - p, y - p, x + p, y + p], fill=PUPIL)
            h = radius * 0.22
            draw.ellipse([x - 2.2 * h, y - 2.4 * h, x - 0.2 * h, y - 0.4 * h], fill=(250, 250, 250))
        covers = parts["lid_covers"]
        for i in range(0, len(covers), 8):
            draw.polygon(_flat(covers[i : i + 8]), fill=c["skin"])
        for start in (36, 42):
            ring = lm[start : start + 6]
            draw.line(_flat(ring[[0, 1, 2, 3]]), fill=DARK, width=line + 1)
            draw.line(_flat(ring[[3, 4, 5, 0]]), fill=c["crease"], width=line)

    def _brows(self, draw: ImageDraw.ImageDraw, lm: np.ndarray) -> None:
        half = 0.5 * self.ident.brow_thickness * self.unit
        taper = np.array([0.6, 0.85, 1.0, 1.0, 0.9])[:, None]
        for brow in (lm[17:22], lm[22:27][::-1]):  # both outer -> inner
            offset = np.array([0.0, half]) * taper
            draw.polygon(_flat(np.vstack([brow - offset, (brow + offset)[::-1]])), fill=self.ident.brows)

    def _creases(
        self, draw: ImageDraw.ImageDraw, parts: dict[str, np.ndarray], amounts: dict[str, float]
    ) -> None:
        groups = {"forehead": 3, "frown": 2, "folds": 3, "nose_wrinkles": 2, "dimple": 2}
        for name, per_line in groups.items():
            amount = amounts[name]
            if amount <= 0.05:
                continue
            color = _mix(self.colors["skin"], DARK, 0.15 + 0.45 * amount)
            pts = parts[name]
            for i in range(0, len(pts), per_line):
                draw.line(_flat(pts[i : i + per_line]), fill=color, width=self.line)

    def _nose(self, draw: ImageDraw.ImageDraw, lm: np.ndarray) -> None:
        c, line = self.colors, self.line
        draw.line(_flat(lm[[28, 31]]), fill=c["shade"], width=line)
        draw.line(_flat(lm[31:36]), fill=c["crease"], width=line)
        r = 0.035 * self.unit
        for x, y in lm[[32, 34]]:
            draw.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=DARK)

    def _mouth(self, draw: ImageDraw.ImageDraw, lm: np.ndarray, mouth_open: float) -> None:
        draw.polygon(_flat(lm[48:60]), fill=self.ident.lips)
        inner = lm[60:68]
        gap = lm[66, 1] - lm[62, 1]
        if gap > 0.6 * self.k:
            draw.polygon(_flat(inner), fill=MOUTH_INSIDE)
            upper = inner[[0, 1, 2, 3, 4]]
            teeth = np.vstack([upper, upper[::-1] + [0, min(0.35 * gap, 0.07 * self.unit)]])
            draw.polygon(_flat(teeth), fill=TEETH)
        draw.line(_flat(inner[[0, 1, 2, 3, 4]]), fill=_mix(self.ident.lips, DARK, 0.6), width=self.line)

    def _glasses(self, draw: ImageDraw.ImageDraw, lm: np.ndarray, parts: dict[str, np.ndarray]) -> None:
        color, width = self.ident.glasses_color, self.line + 1
        lenses = parts["lenses"]
        n = len(lenses) // 2
        right, left = lenses[:n], lenses[n:]
        for lens in (right, left):
            draw.polygon(_flat(lens), outline=color, width=width)
        draw.line(_flat(np.vstack([right[0], left[n // 2]])), fill=color, width=width)
        draw.line(_flat(np.vstack([right[n // 2], lm[0]])), fill=color, width=width)
        draw.line(_flat(np.vstack([left[0], lm[16]])), fill=color, width=width)

    def _light(self, arr: np.ndarray, light: tuple[float, float]) -> np.ndarray:
        gx, gy = _light_grid(self.size)
        angle = self.ident.light_angle + light[0]
        strength = self.ident.light_strength * light[1]
        factor = gx * np.float32(strength * np.cos(angle))
        factor += gy * np.float32(strength * np.sin(angle))
        factor += 1
        lit = arr * factor[..., None]
        np.minimum(lit, 255, out=lit)  # factor stays > 0.3 (strength <= 0.46), so only the top needs clamping
        return lit.astype(np.uint8)
