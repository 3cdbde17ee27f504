"""Labelled ``frames`` datasets for evaluation: SynthFace or a real benchmark in its published layout.

    python -m data_shards evalset --source synth --out runs/data/eval-synth
    python -m data_shards evalset --source fer2013 --path ~/data/fer2013 --out s3://sslfer/eval/fer2013

Every sample carries its own ``split`` (train/val/test from the benchmark, or null); the manifest's split is
``eval``. Real-dataset readers live in :mod:`data_shards.readers`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from common.configio import to_dict
from common.errors import ConfigError

SOURCES = ("synth", "affectnet", "fer2013", "rafdb", "lfw")
REAL_SOURCES = SOURCES[1:]
# Far above any pretraining identity index, so evaluation faces are people the encoder never saw.
DEFAULT_EVAL_IDENTITY_OFFSET = 1_000_000


@dataclass
class EvalsetConfig:
    source: str = "synth"
    out: str = ""
    path: str | None = None  # user path for real datasets
    size: int = 128
    jpeg_quality: int = 90
    shard_samples: int = 2000
    shard_bytes: int = 256 * 2**20
    limit: int | None = None  # stop after this many samples (smoke runs)
    # synth only
    identities: int = 40
    clips_per_identity: int = 2
    seconds: float = 2.0
    frames_per_clip: int = 3
    seed: int = 1
    identity_offset: int | None = None  # None: the synth module's eval offset
    expression_scale: float | None = None  # None: SynthConfig's default
    zoom: float | None = None  # None: SynthConfig's default

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"config key 'source': must be one of {list(SOURCES)}, got {self.source!r}")
        if not self.out:
            raise ConfigError("config key 'out': give --out (a folder or s3://bucket/prefix)")
        if self.source in REAL_SOURCES and not self.path:
            raise ConfigError(f"config key 'path': --source {self.source} needs --path to the dataset folder")
        if self.size < 8:
            raise ConfigError(f"config key 'size': must be >= 8, got {self.size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"config key 'limit': must be >= 1, got {self.limit}")


def _synth_faces(cfg: EvalsetConfig, skip: Callable[[str, str], None]) -> Iterator[Any]:
    synth = importlib.import_module("data_shards.synth")
    offset = cfg.identity_offset
    if offset is None:
        offset = getattr(synth, "EVAL_IDENTITY_OFFSET", None)
    if offset is None:
        try:
            offset = importlib.import_module("data_shards.synth.config").EVAL_IDENTITY_OFFSET
        except (ImportError, AttributeError):
            offset = DEFAULT_EVAL_IDENTITY_OFFSET
    knobs = {
        k: v for k, v in (("expression_scale", cfg.expression_scale), ("zoom", cfg.zoom)) if v is not None
    }
    synth_cfg = synth.SynthConfig(
        identities=cfg.identities,
        clips_per_identity=cfg.clips_per_identity,
        seconds=cfg.seconds,
        seed=cfg.seed,
        size=cfg.size,
        identity_offset=offset,
        **knobs,
    )
    yield from synth.iter_eval_frames(synth_cfg, cfg.frames_per_clip)


def iter_faces(cfg: EvalsetConfig, skip: Callable[[str, str], None]) -> Iterator[Any]:
    """Records with ``.key``, ``.image`` (size x size x 3 uint8) and ``.meta`` for the configured source."""
    if cfg.source == "synth":
        return _synth_faces(cfg, skip)
    reader = importlib.import_module(f"data_shards.readers.{cfg.source}")
    return reader.iter_faces(cfg.path, cfg.size, skip)


def build_evalset(cfg: EvalsetConfig, progress: bool = False) -> dict[str, Any]:
    """Write the evaluation dataset; returns its manifest."""
    from data_shards.write import ShardWriter

    cfg.validate()
    generator = {"command": "evalset", **to_dict(cfg, redact=True)}
    with ShardWriter(
        cfg.out,
        kind="frames",
        split="eval",
        generator=generator,
        max_samples=cfg.shard_samples,
        max_bytes=cfg.shard_bytes,
        jpeg_quality=cfg.jpeg_quality,
    ) as writer:
        faces = iter_faces(cfg, writer.skip)
        if progress:
            from tqdm import tqdm

            faces = tqdm(faces, desc=f"evalset {cfg.source}", unit="img", total=cfg.limit)
        for face in faces:
            writer.write_frame(face)
            if cfg.limit and writer.samples_written >= cfg.limit:
                break
    return writer.manifest


def add_evalset_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalsetConfig()
    parser.add_argument("--source", choices=SOURCES, default=d.source)
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--path", help="dataset folder (or file) for real sources, in its published layout")
    parser.add_argument("--size", type=int, default=d.size, help="square output side in pixels")
    parser.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    parser.add_argument("--shard-samples", type=int, default=d.shard_samples)
    parser.add_argument("--shard-bytes", type=int, default=d.shard_bytes)
    parser.add_argument("--limit", type=int, default=None, help="stop after N samples")
    synth = parser.add_argument_group("synth source")
    synth.add_argument("--identities", type=int, default=d.identities)
    synth.add_argument("--clips-per-identity", type=int, default=d.clips_per_identity)
    synth.add_argument("--seconds", type=float, default=d.seconds)
    synth.add_argument("--frames-per-clip", type=int, default=d.frames_per_clip)
    synth.add_argument("--seed", type=int, default=d.seed)
    synth.add_argument("--identity-offset", type=int, default=None)
    synth.add_argument(
        "--expression-scale",
        type=float,
        default=None,
        help="SynthConfig.expression_scale (default: its default)",
    )
    synth.add_argument("--zoom", type=float, default=None, help="SynthConfig.zoom (default: its default)")


def config_from_args(args: argparse.Namespace) -> EvalsetConfig:
    cfg = EvalsetConfig(
        source=args.source,
        out=args.out,
        path=args.path,
        size=args.size,
        jpeg_quality=args.jpeg_quality,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        limit=args.limit,
        identities=args.identities,
        clips_per_identity=args.clips_per_identity,
        seconds=args.seconds,
        frames_per_clip=args.frames_per_clip,
        seed=args.seed,
        identity_offset=args.identity_offset,
        expression_scale=getattr(args, "expression_scale", None),
        zoom=getattr(args, "zoom", None),
    )
    cfg.validate()
    return cfg
