"""A labelled PNG for eyeballing SynthFace: identities x expressions at full intensity, plus one clip over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.errors import ConfigError
from data_shards.labels import EXPRESSIONS
from data_shards.synth.clip import render_clip, simulate_clip
from data_shards.synth.config import SynthConfig
from data_shards.synth.geometry import face_geometry
from data_shards.synth.identity import make_identity
from data_shards.synth.render import FaceRenderer
from data_shards.synth.timeline import still_timeline

LABEL_W = 90
HEADER_H = 18
CAPTION_H = 28
STRIP_FRAMES = 8


def render_contact_sheet(out_png: str | Path, seed: int, identities: int = 6, size: int = 128) -> Path:
    if identities < 1:
        raise ConfigError(f"config key 'identities': must be >= 1, got {identities}")
    font = ImageFont.load_default()
    cols = len(EXPRESSIONS)
    strip_cfg = SynthConfig(identities=1, clips_per_identity=1, seconds=16.0, seed=seed, size=size)
    strip_cfg.validate()
    width = LABEL_W + cols * size
    height = HEADER_H + identities * size + HEADER_H + size + CAPTION_H
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    for col, name in enumerate(EXPRESSIONS):
        draw.text((LABEL_W + col * size + 4, 3), f"{col} {name}", fill=(0, 0, 0), font=font)
    for row in range(identities):
        ident = make_identity(seed, row, strip_cfg.zoom)
        renderer = FaceRenderer(ident, size)
        y = HEADER_H + row * size
        draw.text((4, y + size // 2 - 12), ident.identity_id, fill=(0, 0, 0), font=font)
        draw.text((4, y + size // 2 + 2), f"{ident.hair_style}", fill=(90, 90, 90), font=font)
        for cls in range(cols):
            tl = still_timeline(cls, 1.0)
            geom = face_geometry(
                ident, tl.action_units[0], size=size, expression_scale=strip_cfg.expression_scale
            )
            sheet.paste(Image.fromarray(renderer.render(geom)), (LABEL_W + cls * size, y))

    # One clip over time: expressions blend, the mouth talks, the head and light drift.
    sim = simulate_clip(strip_cfg, 0, 0)
    positions = np.linspace(0, len(sim.geometry) - 1, STRIP_FRAMES).round().astype(int).tolist()
    y = HEADER_H + identities * size
    draw.text(
        (4, y + 3), f"clip {sim.key} over time (t s, class, valence/arousal)", fill=(0, 0, 0), font=font
    )
    y += HEADER_H
    for col, (i, frame) in enumerate(zip(positions, render_clip(strip_cfg, sim, positions))):
        x = LABEL_W + col * size
        sheet.paste(Image.fromarray(frame), (x, y))
        tl = sim.timeline
        va = tl.valence_arousal[i]
        draw.text(
            (x + 2, y + size + 2),
            f"{i / strip_cfg.fps:.1f}s {EXPRESSIONS[tl.expression[i]]}",
            fill=(0, 0, 0),
            font=font,
        )
        draw.text((x + 2, y + size + 14), f"v{va[0]:+.2f} a{va[1]:+.2f}", fill=(90, 90, 90), font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
