"""Face geometry: identity shape + action units + nuisance -> 68 iBUG landmarks and the outlines drawn from them.

Everything is built in a canonical 3D face frame (face units, x right in the image, y down, z towards the
camera), deformed by the AUs, rotated by the head pose and projected orthographically to pixels. The renderer
draws from exactly these points, so the landmarks are the drawn geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_shards.synth.expression import AU, AU_NAMES
from data_shards.synth.identity import Identity, make_identity


@dataclass
class FaceGeometry:
    landmarks: np.ndarray  # (68, 2) pixels of the output image
    parts: dict[str, np.ndarray]  # named outlines/lines in pixels (head, hair, lids, wrinkles, glasses, ...)
    amounts: dict[str, float]  # how strongly to draw optional features (wrinkles, blush, mouth opening)
    iris_radius: float  # pixels


def _unit(value: float, high: float = 1.0) -> float:
    return min(max(value, 0.0), high)  # scalar clip: np.clip costs microseconds per call


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _with_depth(xy: np.ndarray, face_width: float, bump: float | np.ndarray = 0.0) -> np.ndarray:
    """Lift 2D face points onto a rounded surface so yaw/pitch move near and far points differently."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    z = 0.55 * np.sqrt(np.maximum(1 - (xy[:, 0] / (face_width * 1.05)) ** 2, 0)) + bump
    return np.column_stack([xy, np.broadcast_to(z, len(xy))])


def _lip_profile(
    x: np.ndarray, half_widths: tuple[float, float], corners_y: tuple[float, float], mid_y: float
):
    """y of a lip edge at x: a parabola from the (per-side) corner height to the middle height."""
    left = x < 0
    hw = np.where(left, half_widths[0], half_widths[1])
    cy = np.where(left, corners_y[0], corners_y[1])
    return cy + (mid_y - cy) * (1 - np.minimum(np.abs(x) / hw, 1) ** 2)


def face_geometry(
    ident: Identity,
    au: np.ndarray,
    *,
    speech: float = 0.0,
    blink: float = 0.0,
    gaze: tuple[float, float] = (0.0, 0.0),
    pose: tuple[float, float, float] = (0.0, 0.0, 0.0),
    size: int = 128,
    expression_scale: float = 1.0,
) -> FaceGeometry:
    """Landmarks and outlines of ``ident`` showing AU intensities ``au`` (each in [0, 1]).

    ``expression_scale`` is the gain from AU intensity to face deformation: every AU moves the face as an AU
    ``expression_scale`` times as intense would at gain 1 (the original geometry), with lid, lip and jaw extents
    clamped to what a face can do. It changes what is drawn, never the AU labels.
    """
    a = {name: float(au[i]) * expression_scale for name, i in AU.items()}
    fw = ident.face_width
    ear_y = ident.eye_y + 0.02
    mouth_open = _unit(a["AU26"] + speech + 0.25 * a["AU20"] + 0.15 * a["AU10"], 1.4)
    jaw_drop = 0.16 * mouth_open

    # Jaw 0-16: ear level on the image left, round the chin, up to the image right.
    theta = np.linspace(np.pi, 0, 17)
    jaw_x = fw * np.cos(theta) * (1 - ident.jaw_taper * np.sin(theta) ** 2 * 0.6)
    jaw_y = ear_y + (ident.chin_y - ear_y) * np.sin(theta) + jaw_drop * np.sin(theta) ** 3
    jaw = _with_depth(np.column_stack([jaw_x, jaw_y]), fw)
    jaw[:, 2] -= 0.25 * np.abs(np.cos(theta))

    # Brows 17-26: centre lines; u runs outer (0) -> inner (1).
    u = np.linspace(0, 1, 5)
    brows = []
    for side in (-1, 1):
        x_outer = side * (ident.eye_x + ident.eye_half_width * 1.25)
        x_inner = side * (ident.eye_x - ident.eye_half_width * 1.15)
        x = x_outer + (x_inner - x_outer) * u - side * 0.05 * a["AU4"] * u
        y = (
            ident.eye_y
            - ident.eye_height
            - ident.brow_gap
            - ident.brow_arch * np.sin(np.pi * u)
            - 0.12 * a["AU1"] * u**1.5
            - 0.11 * a["AU2"] * (1 - u) ** 1.5
            + 0.075 * a["AU4"] * (0.3 + 0.7 * u)
        )
        pts = np.column_stack([x, y])
        brows.append(pts if side < 0 else pts[::-1])  # left brow (22-26) runs inner -> outer
    brow_pts = _with_depth(np.vstack(brows), fw, 0.08)

    # Nose 27-35.
    tip = ident.nose_tip_y
    bridge = np.column_stack([np.zeros(4), np.linspace(ident.eye_y, tip, 4)])
    bridge3 = _with_depth(bridge, fw, np.linspace(0.05, 0.35, 4))
    nw = ident.nose_width * (1 + 0.25 * a["AU9"])
    nostril_y = tip + np.array([0.02, 0.05, 0.065, 0.05, 0.02]) - 0.05 * a["AU9"] - 0.02 * a["AU10"]
    nostrils = _with_depth(
        np.column_stack([nw * np.array([-1, -0.5, 0, 0.5, 1]), nostril_y]),
        fw,
        np.array([0.1, 0.18, 0.22, 0.18, 0.1]),
    )

    # Eyes 36-47: lids open with AU5, close with AU6/AU7 and blinks.
    up_h = ident.eye_height * (1 + 0.9 * a["AU5"] - 0.45 * a["AU7"] - 0.25 * a["AU6"]) * (1 - blink)
    lo_h = (
        ident.eye_height
        * 0.75
        * (1 - 0.55 * a["AU6"] - 0.35 * a["AU7"] + 0.15 * a["AU5"])
        * (1 - 0.5 * blink)
    )
    up_h, lo_h = max(up_h, 0.004), max(lo_h, 0.004)
    hw = ident.eye_half_width
    eyes, covers, irises, lenses = [], [], [], []
    for side in (-1, 1):
        cx, cy = side * ident.eye_x, ident.eye_y
        outer, inner = cx + side * hw, cx - side * hw
        o_mid, i_mid = cx + side * 0.35 * hw, cx - side * 0.35 * hw
        corner_o, corner_i = (outer, cy), (inner, cy + 0.008)
        if side < 0:  # right eye 36-41: outer, upper x2, inner, lower x2
            ring = [
                corner_o,
                (o_mid, cy - up_h),
                (i_mid, cy - up_h),
                corner_i,
                (i_mid, cy + lo_h),
                (o_mid, cy + lo_h),
            ]
        else:  # left eye 42-47: inner, upper x2, outer, lower x2
            ring = [
                corner_i,
                (i_mid, cy - up_h),
                (o_mid, cy - up_h),
                corner_o,
                (o_mid, cy + lo_h),
                (i_mid, cy + lo_h),
            ]
        ring = np.array(ring)
        eyes.append(ring)
        # Skin-coloured masks above/below the lids hide the part of the iris the lids would cover.
        (lx, ly), (rx, ry) = ring[0], ring[3]
        for lid, edge in ((ring[[0, 1, 2, 3]], cy - 0.22), (ring[[0, 5, 4, 3]], cy + 0.2)):
            covers.append(
                np.vstack([[[lx - 0.04, ly]], lid, [[rx + 0.04, ry], [rx + 0.04, edge], [lx - 0.04, edge]]])
            )
        irises.append([cx + gaze[0] * 0.35 * hw, cy + gaze[1] * 0.3 * ident.eye_height])
        ang = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        lenses.append(np.column_stack([cx + hw * 1.6 * np.cos(ang), cy + 0.02 + 0.17 * np.sin(ang)]))
    eye_pts = _with_depth(np.vstack(eyes), fw, 0.02)

    # Mouth 48-67: corners pulled up (AU12), down (AU15), out (AU20), in (AU23); AU14 lifts one corner.
    my = ident.mouth_y
    mw = ident.mouth_half_width * (1 + 0.18 * a["AU12"] + 0.22 * a["AU20"] - 0.18 * a["AU23"])
    corner_y = my - 0.1 * a["AU12"] + 0.09 * a["AU15"] + 0.02 * a["AU20"] - 0.02 * a["AU10"]
    widths = (mw, mw + 0.06 * a["AU14"])
    corners_y = (corner_y, corner_y - 0.08 * a["AU14"])
    upper_mid = my - 0.05 * a["AU10"] + 0.01 * a["AU15"]
    lower_mid = upper_mid + jaw_drop * 1.1 + 0.004
    thin = max(1 - 0.55 * a["AU23"], 0.25) * max(1 - 0.3 * a["AU20"], 0.5)
    t_up, t_lo = ident.lip_thickness * thin, ident.lip_thickness * 1.25 * thin
    xo = np.array([-0.68, -0.3, 0.0, 0.3, 0.68])
    xs_up = np.where(xo < 0, xo * widths[0], xo * widths[1])
    inner_up_y = _lip_profile(xs_up, widths, corners_y, upper_mid)
    outer_up = np.column_stack(
        [xs_up, inner_up_y - t_up * (1 - 0.3 * xo**2) + np.array([0, 0, 0.3 * t_up, 0, 0])]
    )
    xs_lo = xs_up[::-1]
    outer_lo = np.column_stack(
        [xs_lo, _lip_profile(xs_lo, widths, corners_y, lower_mid) + t_lo * (1 - 0.4 * xo**2)]
    )
    xi = np.array([-0.5, 0.0, 0.5])
    xs_in = np.where(xi < 0, xi * widths[0], xi * widths[1]) * 0.95
    inner_up = np.column_stack([xs_in, _lip_profile(xs_in, widths, corners_y, upper_mid)])
    inner_lo = np.column_stack([xs_in[::-1], _lip_profile(xs_in[::-1], widths, corners_y, lower_mid)])
    c_left = np.array([[-widths[0], corners_y[0]]])
    c_right = np.array([[widths[1], corners_y[1]]])
    mouth = np.vstack(
        [c_left, outer_up, c_right, outer_lo, c_left * [0.92, 1], inner_up, c_right * [0.92, 1], inner_lo]
    )
    mouth_pts = _with_depth(mouth, fw, 0.12)

    landmarks3 = np.vstack([jaw, brow_pts, bridge3, nostrils, eye_pts, mouth_pts])

    # Outlines that are not landmarks, in the same canonical frame.
    top_theta = np.linspace(0, -np.pi, 17)[1:-1]
    head_top = np.column_stack([fw * np.cos(top_theta), ear_y + ident.head_top * np.sin(top_theta)])
    parts2: dict[str, np.ndarray] = {"head_top": head_top}
    hair_theta = np.linspace(0.2, -np.pi - 0.2, 21)
    hair_outer = np.column_stack(
        [fw * 1.08 * np.cos(hair_theta), ear_y + (ident.head_top * 1.08 + 0.04) * np.sin(hair_theta)]
    )
    hx = np.linspace(-fw, fw, 11)  # hairline runs back from the left temple to the right
    hairline_y = (
        ident.eye_y
        - ident.brow_gap
        - 0.45
        + (ear_y - 0.05 - (ident.eye_y - ident.brow_gap - 0.45)) * (np.abs(hx) / fw) ** 3
    )
    if ident.hair_style == "fringe":
        hairline_y = hairline_y + 0.28 * (hx / fw + 1) / 2
    parts2["hair"] = np.vstack([hair_outer, np.column_stack([hx, hairline_y])])
    back_theta = np.linspace(0.0, -np.pi, 19)
    if ident.hair_style == "long":
        back = np.column_stack(
            [fw * 1.12 * np.cos(back_theta), ear_y + ident.head_top * 1.1 * np.sin(back_theta)]
        )
        low = ident.chin_y + 0.35
        parts2["hair_back"] = np.vstack([[[fw * 1.25, low]], back, [[-fw * 1.25, low]]])
    elif ident.hair_style == "curly":
        ang = np.linspace(0, 2 * np.pi, 36, endpoint=False)
        radius = 1 + 0.06 * np.sin(9 * ang)
        parts2["hair_back"] = np.column_stack(
            [fw * 1.3 * radius * np.cos(ang), ear_y - 0.35 + ident.head_top * 1.05 * radius * np.sin(ang)]
        )
    ear_ang = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    for name, side in (("ear_left", -1), ("ear_right", 1)):
        parts2[name] = np.column_stack(
            [side * fw * 1.0 + 0.1 * np.cos(ear_ang), ear_y + 0.12 + 0.19 * np.sin(ear_ang)]
        )
    parts2["lid_covers"] = np.vstack(covers)
    parts2["irises"] = np.array(irises)
    parts2["lenses"] = np.vstack(lenses)
    brow2 = np.vstack(brows)
    mean_brow_y = float(brow2[:, 1].mean())
    fx = np.array([-0.32, 0.0, 0.32])
    parts2["forehead"] = np.vstack(
        [np.column_stack([fx, mean_brow_y - d + 0.03 * np.abs(fx) / 0.32]) for d in (0.12, 0.2)]
    )
    inner_r, inner_l = brow2[4], brow2[5]
    parts2["frown"] = np.array(
        [[inner_r[0] + 0.04, inner_r[1] - 0.03], [inner_r[0] + 0.06, inner_r[1] + 0.1],
         [inner_l[0] - 0.04, inner_l[1] - 0.03], [inner_l[0] - 0.06, inner_l[1] + 0.1]]
    )  # fmt: skip
    folds = []
    for side, cx, cy in ((-1, -widths[0], corners_y[0]), (1, widths[1], corners_y[1])):
        folds.append(
            [[side * (nw + 0.05), tip - 0.02], [cx + side * 0.07, cy - 0.06], [cx + side * 0.09, cy + 0.12]]
        )
    parts2["folds"] = np.array(folds).reshape(-1, 2)
    b28 = bridge[1]
    parts2["nose_wrinkles"] = np.array(
        [[-0.07, b28[1] + 0.03], [0.07, b28[1] + 0.03], [-0.06, b28[1] + 0.09], [0.06, b28[1] + 0.09]]
    )
    parts2["cheeks"] = np.array([[-ident.eye_x, ident.eye_y + 0.3], [ident.eye_x, ident.eye_y + 0.3]])
    parts2["dimple"] = np.array(
        [[widths[1] + 0.02, corners_y[1] - 0.05], [widths[1] + 0.05, corners_y[1] + 0.03]]
    )
    low_lip = float(outer_lo[:, 1].max())
    parts2["beard"] = np.vstack(
        [
            np.column_stack([jaw_x[2:15], jaw_y[2:15]]),
            [[widths[1] + 0.12, corner_y - 0.1], [widths[1] * 0.5, low_lip + 0.05], [0, low_lip + 0.06]],
            [[-widths[0] * 0.5, low_lip + 0.05], [-widths[0] - 0.12, corner_y - 0.1]],
        ]
    )
    parts2["moustache"] = np.vstack(
        [[[-widths[0] - 0.03, corners_y[0] + 0.01]], outer_up - [0, 0.005], [[widths[1] + 0.03, corners_y[1] + 0.01]],
         outer_up[::-1] - [0, 0.07]]
    )  # fmt: skip

    names = list(parts2)
    counts = [len(parts2[n]) for n in names]
    extra3 = _with_depth(np.vstack([parts2[n] for n in names]), fw, 0.05)
    for i, name in enumerate(names):
        if name in ("lenses",):
            start = sum(counts[:i])
            extra3[start : start + counts[i], 2] += 0.2  # glasses sit in front of the face
    everything = np.vstack([landmarks3, extra3]) @ _rotation(*pose).T
    px = everything[:, :2] * (ident.scale * size) + np.array(ident.center) * size
    landmarks = px[:68]
    parts: dict[str, np.ndarray] = {}
    start = 68
    for name, n in zip(names, counts):
        parts[name] = px[start : start + n]
        start += n
    parts["head"] = np.vstack([landmarks[:17], parts.pop("head_top")])

    amounts = {
        "mouth_open": mouth_open,
        "forehead": _unit(0.7 * a["AU1"] + 0.5 * a["AU2"] - 0.15),
        "frown": _unit(a["AU4"] - 0.1),
        "folds": _unit(0.9 * a["AU12"] + 0.7 * a["AU10"] + 0.4 * a["AU9"] + 0.3 * a["AU20"] + 0.1),
        "nose_wrinkles": _unit(a["AU9"] - 0.1),
        "cheeks": _unit(a["AU6"]),
        "dimple": _unit(a["AU14"] - 0.1),
    }
    return FaceGeometry(
        landmarks, parts, amounts, ident.eye_height * 1.05 * ident.iris_scale * ident.scale * size
    )


def aligned_shapes(landmarks: np.ndarray) -> np.ndarray:
    """(N, 68, 2) shapes -> (N, 136) features: each shape similarity-Procrustes aligned to a frontal neutral
    template (removes position, scale and roll), the geometry a landmark-based expression probe reads."""
    template = face_geometry(make_identity(0, 0), np.zeros(len(AU_NAMES)), size=128).landmarks
    template = template - template.mean(0)
    template /= np.linalg.norm(template)
    out = []
    for shape in landmarks:
        x = shape - shape.mean(0)
        x /= np.linalg.norm(x)
        u, _, vt = np.linalg.svd(x.T @ template)
        out.append((x @ (u @ vt)).ravel())
    return np.asarray(out)
