"""Command-line glue: SynthConfig arguments for ``python -m data_shards synth`` and the contact-sheet command."""

from __future__ import annotations

import argparse

from data_shards.synth.config import SynthConfig


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    group = parser.add_argument_group("SynthFace")
    group.add_argument("--identities", type=int, default=d.identities, help="number of people")
    group.add_argument("--clips-per-identity", type=int, default=d.clips_per_identity)
    group.add_argument("--seconds", type=float, default=d.seconds, help="clip length")
    group.add_argument("--seed", type=int, default=d.seed)
    group.add_argument("--fps", type=float, default=d.fps, help="frames per second (default 25/6)")
    group.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    group.add_argument(
        "--identity-offset",
        type=int,
        default=d.identity_offset,
        help="first identity index (eval sets: 1000000)",
    )
    group.add_argument(
        "--expression-scale",
        type=float,
        default=d.expression_scale,
        help="gain from AU intensity to face deformation, in [0.5, 3] (1.0: the first corpus)",
    )
    group.add_argument(
        "--zoom",
        type=float,
        default=d.zoom,
        help="face size in the frame, in [0.75, 1.35] (1.0: the first corpus, whole head and shoulders)",
    )
    group.add_argument(
        "--landmarks",
        choices=["detector", "exact"],
        default=d.landmarks,
        help="landmarks the shards carry: detector-like (default, as ingested data) or the generator's exact "
        "points (an oracle for MaskFN); the exact ones are kept as evaluation labels either way",
    )


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    cfg = SynthConfig(
        identities=args.identities,
        clips_per_identity=args.clips_per_identity,
        seconds=args.seconds,
        seed=args.seed,
        fps=args.fps,
        size=args.size,
        identity_offset=getattr(args, "identity_offset", 0),
        expression_scale=getattr(args, "expression_scale", SynthConfig.expression_scale),
        zoom=getattr(args, "zoom", SynthConfig.zoom),
        landmarks=getattr(args, "landmarks", SynthConfig.landmarks),
    )
    cfg.validate()
    return cfg


def main_contact_sheet(argv: list[str] | None = None) -> int:
    from data_shards.synth.contact_sheet import render_contact_sheet

    parser = argparse.ArgumentParser(
        prog="python -m data_shards contact-sheet", description="SynthFace identities x expressions, as a PNG"
    )
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    out = render_contact_sheet(args.out, args.seed, args.identities, args.size)
    print(f"wrote {out}")
    return 0
