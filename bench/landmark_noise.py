"""How far detector landmarks are from SynthFace's exact ones, and what that does to MaskFN's descriptor.

    python bench/landmark_noise.py [--identities 24] [--seconds 12] [--size 128] [--seed 0]

1. Runs the ingest detector (dlib HOG + the 68-point predictor, as ``python -m data_shards ingest`` does) on
   rendered SynthFace frames and reports the detection rate and the normalised mean error (NME, per landmark
   group, in inter-ocular distances) against the generator's exact landmarks.
2. Fits the detector model that SynthFace shards carry by default (:mod:`data_shards.synth.landmark_noise`)
   on half of the clips; ``--write`` saves it as the shipped model (do so when the renderer changes).
3. MaskFN's landmark-geometry descriptor on frames of many clips: how often the most similar negative has the
   anchor's expression class, on the other (held-out) half of the clips, with exact landmarks, dlib's (where
   it finds the face) and the model's; the oracle (nearest true action-unit vector) and chance for reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.faces import FaceAligner, FaceConfig  # noqa: E402
from data_shards.synth.clip import render_clip, simulate_clip  # noqa: E402
from data_shards.synth.config import SynthConfig  # noqa: E402
from data_shards.synth.landmark_noise import DetectorNoise, fit_noise  # noqa: E402
from pretrain.descriptors import landmark_descriptor  # noqa: E402

GROUPS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48)}
GROUPS["mouth"] = range(48, 68)


def pick_rate(descriptors: np.ndarray, expression: np.ndarray, clip: np.ndarray) -> float:
    """Fraction of anchors whose most similar frame of ANOTHER clip has the anchor's expression class."""
    x = descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    sim[clip[:, None] == clip[None, :]] = -np.inf
    return float(np.mean(expression[sim.argmax(1)] == expression))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stride", type=int, default=2, help="every n-th frame of a clip")
    parser.add_argument("--write", action="store_true", help="save the fitted model as the shipped default")
    args = parser.parse_args(argv)

    cfg = SynthConfig(identities=args.identities, clips_per_identity=1, seconds=args.seconds, seed=args.seed)
    cfg = SynthConfig(**{**cfg.__dict__, "size": args.size})
    aligner = FaceAligner(FaceConfig())
    exact, detected, found, expression, units, clips, frame_index = [], [], [], [], [], [], []
    started = time.perf_counter()
    for identity in range(args.identities):
        sim = simulate_clip(cfg, identity, 0)
        positions = list(range(0, len(sim.geometry), args.stride))
        for i, rgb in zip(positions, render_clip(cfg, sim, positions)):
            boxes = aligner.detect(rgb)
            points = aligner.landmarks(rgb, boxes[0]) if boxes else np.full((68, 2), np.nan)
            exact.append(sim.geometry[i].landmarks)
            detected.append(points)
            found.append(bool(boxes))
            expression.append(int(sim.timeline.expression[i]))
            units.append(sim.timeline.action_units[i])
            clips.append(identity)
            frame_index.append(i)
    seconds = time.perf_counter() - started
    exact, detected = np.asarray(exact, np.float64), np.asarray(detected, np.float64)
    found, expression, units = np.asarray(found), np.asarray(expression), np.asarray(units)
    clips, frame_index = np.asarray(clips), np.asarray(frame_index)
    print(
        f"frames: {len(found)} from {args.identities} clips at {args.size} px; render + detect {seconds:.1f} s"
    )
    print(f"dlib found the face in {found.mean():.1%} of frames")

    iod = np.linalg.norm(exact[:, 36:42].mean(1) - exact[:, 42:48].mean(1), axis=1)
    error = np.linalg.norm(detected - exact, axis=2) / iod[:, None]
    print("NME of dlib vs exact (inter-ocular units, frames where found):")
    by_group = " | ".join(f"{name} {np.nanmean(error[found][:, list(i)]):.3f}" for name, i in GROUPS.items())
    print(f"  all {np.nanmean(error[found]):.3f} | {by_group}")

    # fit on the first half of the clips, judge on the other half
    fit_on, judge = found & (clips < args.identities // 2), found & (clips >= args.identities // 2)
    noise = fit_noise(exact[fit_on], detected[fit_on], clips[fit_on], frame_index[fit_on], args.stride)
    if args.write:
        noise.save()
        print("saved the fitted model as data_shards/synth/landmark_noise.json")
    print(
        f"fitted model: mean slope {noise.slope.mean():.3f} (mouth {noise.slope[96:136].mean():.3f}), "
        f"residual floor {noise.floor:.4f}, frame-to-frame correlation {noise.correlation:.3f}"
    )
    model = DetectorNoise.default()
    rng = np.random.default_rng(args.seed)
    modelled = np.concatenate([model.apply(exact[clips == c], rng) for c in np.unique(clips)])
    model_error = np.linalg.norm(modelled - exact, axis=2) / iod[:, None]
    print(
        f"NME of the shipped model vs exact: {model_error[judge].mean():.3f} "
        f"(dlib: {np.nanmean(error[judge]):.3f}), held-out clips"
    )

    def describe(points: np.ndarray) -> np.ndarray:
        return landmark_descriptor(torch.as_tensor(points, dtype=torch.float32)).numpy()

    on = judge
    rates = {
        "exact landmarks": pick_rate(describe(exact[on]), expression[on], clips[on]),
        "dlib landmarks": pick_rate(describe(detected[on]), expression[on], clips[on]),
        "noise-model landmarks": pick_rate(describe(modelled[on]), expression[on], clips[on]),
        "oracle (true AU vector)": pick_rate(units[on], expression[on], clips[on]),
    }
    same = expression[on][:, None] == expression[on][None, :]
    other = clips[on][:, None] != clips[on][None, :]
    rates["chance"] = float(same[other].mean())
    print("MaskFN pick rate on held-out clips: the most similar other-clip frame has the anchor's class")
    for name, rate in rates.items():
        print(f"  {name:26s} {rate:.1%}")
    print(f"  ratio noise-model / dlib: {rates['noise-model landmarks'] / rates['dlib landmarks']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
