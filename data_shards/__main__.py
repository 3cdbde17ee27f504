"""``python -m data_shards {synth,contact-sheet,ingest,evalset,verify}``: build and check shard datasets.

Each subcommand imports its implementation lazily, so a module that is missing or broken only breaks the
subcommand that needs it. User errors (bad config, credentials, layouts) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Callable

from common.errors import ConfigError

DELEGATED = {
    "contact-sheet": ("data_shards.synth.cli", "main_contact_sheet", "a grid of SynthFace frames (PNG)"),
    "ingest": (
        "data_shards.ray_ingest",  # the single-process ingest, or with --ray [ADDRESS] Ray tasks
        "main",
        "--videos DIR: videos / frame folders -> aligned clip shards; --images DIR: photos -> frames shards"
        " [--ray [ADDRESS]: fanned out on Ray]",
    ),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_shards.manifest import ManifestError
    from data_shards.readers import LayoutError
    from data_shards.store import StoreError

    return (ConfigError, StoreError, ManifestError, LayoutError)


def _print_summary(manifest: dict, url: str, seconds: float) -> None:
    totals = manifest["totals"]
    mb = totals["bytes"] / 1e6
    print(
        f"wrote {totals['samples']} samples ({totals['frames']} frames, {totals['identities']} identities) "
        f"in {totals['shards']} shards, {mb:.1f} MB, to {url} in {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB/s)"
    )
    if manifest["skipped"]:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items()))


def _save_local_config(cfg, out: str) -> None:
    from common.configio import save_config
    from data_shards import store

    if not store.is_s3(out):
        save_config(cfg, f"{out}/config.yaml")


def cmd_synth(argv: list[str]) -> int:
    from data_shards.synth import iter_clips
    from data_shards.synth.cli import add_synth_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m data_shards synth", description="SynthFace clip shards")
    add_synth_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--shard-samples", type=int, default=200, help="clips per shard (at most)")
    parser.add_argument("--shard-bytes", type=int, default=256 * 2**20, help="bytes per shard (at most)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    from tqdm import tqdm

    from common.configio import to_dict
    from data_shards.write import ShardWriter

    generator = {"command": "synth", **to_dict(cfg, redact=True)}
    total = None
    if hasattr(cfg, "identities") and hasattr(cfg, "clips_per_identity"):
        total = cfg.identities * cfg.clips_per_identity
    start = time.monotonic()
    with ShardWriter(
        args.out,
        kind="clips",
        split=getattr(cfg, "split", None) or "pretrain",
        generator=generator,
        max_samples=args.shard_samples,
        max_bytes=args.shard_bytes,
        jpeg_quality=args.jpeg_quality,
    ) as writer:
        _save_local_config(cfg, args.out)
        for clip in tqdm(iter_clips(cfg), total=total, unit="clip", disable=args.no_progress):
            writer.write_clip(clip)
    _print_summary(writer.manifest, args.out, time.monotonic() - start)
    return 0


def cmd_evalset(argv: list[str]) -> int:
    from data_shards.evalsets import add_evalset_arguments, build_evalset, config_from_args

    parser = argparse.ArgumentParser(
        prog="python -m data_shards evalset", description="labelled frames shards"
    )
    add_evalset_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    start = time.monotonic()
    manifest = build_evalset(cfg, progress=not args.no_progress)
    _save_local_config(cfg, cfg.out)
    _print_summary(manifest, cfg.out, time.monotonic() - start)
    return 0


def cmd_verify(argv: list[str]) -> int:
    from data_shards.verify import verify

    parser = argparse.ArgumentParser(
        prog="python -m data_shards verify", description="check shards vs manifest"
    )
    parser.add_argument("url", help="dataset folder or s3://bucket/prefix (holding manifest.json)")
    args = parser.parse_args(argv)
    report = verify(args.url)
    print(report.summary())
    return 0 if report.ok else 1


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "synth": (cmd_synth, "SynthFace clips -> pretraining shards"),
    "evalset": (cmd_evalset, "labelled frames shards (synth, affectnet, fer2013, rafdb, lfw)"),
    "verify": (cmd_verify, "check every shard against manifest.json"),
}


def _usage() -> str:
    lines = ["usage: python -m data_shards COMMAND [options]   (COMMAND --help for options)", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:14s}{text}")
    for name, (_, _, text) in DELEGATED.items():
        lines.append(f"  {name:14s}{text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if command in DELEGATED:
        module_name, function, _ = DELEGATED[command]
        return int(getattr(importlib.import_module(module_name), function)(rest) or 0)
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
