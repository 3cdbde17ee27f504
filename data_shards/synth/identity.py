"""Identity: everything about a synthetic person that stays fixed across their clips (strong, easy cues)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Color = tuple[int, int, int]

SKIN_TONES: tuple[Color, ...] = (
    (255, 224, 196), (241, 194, 155), (224, 172, 129), (198, 134, 96),
    (161, 102, 66), (120, 74, 46), (87, 54, 36), (236, 188, 180),
)  # fmt: skip
HAIR_COLORS: tuple[Color, ...] = (
    (22, 18, 16), (60, 38, 24), (110, 72, 40), (200, 160, 90),
    (160, 70, 30), (150, 150, 150), (235, 225, 200), (40, 60, 140), (170, 40, 110),
)  # fmt: skip
EYE_COLORS: tuple[Color, ...] = ((70, 45, 25), (110, 75, 40), (60, 110, 170), (70, 130, 80), (110, 120, 130))
HAIR_STYLES = ("bald", "short", "fringe", "long", "curly")
BACKGROUND_PATTERNS = ("plain", "stripes", "dots", "gradient", "checker")


@dataclass(frozen=True)
class Identity:
    index: int
    # shape, in face units (cheek half-width ~1, y down, origin between the eyes' level and the nose)
    face_width: float
    chin_y: float
    jaw_taper: float
    head_top: float
    eye_x: float
    eye_y: float
    eye_half_width: float
    eye_height: float
    iris_scale: float
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    nose_tip_y: float
    nose_width: float
    mouth_y: float
    mouth_half_width: float
    lip_thickness: float
    scale: float  # face unit -> fraction of the image size
    center: tuple[float, float]  # face origin as a fraction of the image size
    # appearance
    skin: Color
    lips: Color
    hair: Color
    hair_style: str
    brows: Color
    eyes: Color
    glasses: bool
    glasses_color: Color
    beard: bool
    clothes: Color
    background: Color
    background_accent: Color
    background_pattern: str
    pattern_period: int
    light_angle: float  # radians, direction the light comes from in the image plane
    light_strength: float

    @property
    def identity_id(self) -> str:
        return f"synth-i{self.index:07d}"


def _jitter_color(rng: np.random.Generator, base: Color, spread: float) -> Color:
    return tuple(int(np.clip(c + rng.normal(0, spread), 0, 255)) for c in base)  # type: ignore[return-value]


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def make_identity(seed: int, index: int, zoom: float = 1.0) -> Identity:
    """Deterministic from (seed, index) alone, so any worker can rebuild any identity.

    ``zoom`` frames the face tighter (> 1) or looser than the original framing (1.0: whole head and shoulders,
    the face ~55% of the image width); the face is moved up as it grows so the chin stays in the image. It
    draws no random numbers, so the same person comes out at every zoom.
    """
    rng = np.random.default_rng([seed, index, 0x1D])
    u = rng.uniform
    skin = _jitter_color(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 8)
    hair = _jitter_color(rng, HAIR_COLORS[rng.integers(len(HAIR_COLORS))], 10)
    style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    background = tuple(int(v) for v in rng.integers(30, 226, size=3))
    accent = _mix(background, (255, 255, 255) if sum(background) < 380 else (0, 0, 0), u(0.2, 0.45))
    return Identity(
        index=index,
        face_width=u(0.86, 1.04),
        chin_y=u(0.95, 1.12),
        jaw_taper=u(0.1, 0.45),
        head_top=u(1.15, 1.35),
        eye_x=u(0.36, 0.45),
        eye_y=u(-0.2, -0.1),
        eye_half_width=u(0.14, 0.18),
        eye_height=u(0.055, 0.075),
        iris_scale=u(0.9, 1.15),
        brow_gap=u(0.15, 0.22),
        brow_thickness=u(0.035, 0.08),
        brow_arch=u(0.0, 0.06),
        nose_tip_y=u(0.2, 0.3),
        nose_width=u(0.12, 0.19),
        mouth_y=u(0.52, 0.6),
        mouth_half_width=u(0.24, 0.31),
        lip_thickness=u(0.045, 0.075),
        scale=u(0.28, 0.31) * zoom,
        center=(0.5 + u(-0.03, 0.03), 0.47 - 0.22 * (zoom - 1) + u(-0.02, 0.02)),
        skin=skin,
        lips=_mix(skin, (170, 60, 70), u(0.3, 0.55)),
        hair=hair,
        hair_style=style,
        brows=_mix(hair, (20, 15, 10), 0.35) if style != "bald" else _mix(skin, (40, 30, 20), 0.6),
        eyes=_jitter_color(rng, EYE_COLORS[rng.integers(len(EYE_COLORS))], 10),
        glasses=bool(rng.random() < 0.3),
        glasses_color=tuple(int(v) for v in rng.integers(0, 120, size=3)),  # type: ignore[arg-type]
        beard=bool(rng.random() < 0.25),
        clothes=tuple(int(v) for v in rng.integers(20, 236, size=3)),  # type: ignore[arg-type]
        background=background,  # type: ignore[arg-type]
        background_accent=accent,
        background_pattern=BACKGROUND_PATTERNS[rng.integers(len(BACKGROUND_PATTERNS))],
        pattern_period=int(rng.integers(8, 24)),
        light_angle=u(0, 2 * np.pi),
        light_strength=u(0.15, 0.35),
    )
