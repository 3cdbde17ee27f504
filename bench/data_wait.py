"""Throughput and data-wait share of a training run, from its ``metrics.jsonl``.

    python bench/data_wait.py RUN_DIR/metrics.jsonl [--skip 1]

The first ``--skip`` logged windows hold the input pipeline's start-up (the first batch is awaited while
nothing is queued) and are left out. Prints the median images/s and the data-wait share of step time
(``data_wait_fraction``: time the training loop waited for a batch / window time), mean and worst, and the
share spent on the device side of the input in the training thread (``input_prep_fraction``: decode,
FaceSwap and views queued on the GPU stream; on a GPU this is host time to queue the work, which overlaps the
stream as long as nothing syncs), as one Markdown table row. The goal (DESIGN.md): the input pipeline is never the bottleneck, data wait < 5%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarise(lines: list[dict], skip: int = 1) -> dict:
    windows = [m for m in lines if "data_wait_fraction" in m and "images_per_s" in m]
    if len(windows) <= skip:
        raise ValueError(f"{len(windows)} logged windows, need more than --skip {skip}: run more steps")
    kept = windows[skip:]
    waits = [m["data_wait_fraction"] for m in kept]
    preps = [m.get("input_prep_fraction", 0.0) for m in kept]
    return {
        "windows": len(kept),
        "steps": (kept[0]["step"], kept[-1]["step"]),
        "images_per_s": statistics.median(m["images_per_s"] for m in kept),
        "wait_mean": statistics.fmean(waits),
        "wait_max": max(waits),
        "prep_mean": statistics.fmean(preps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--skip", type=int, default=1, help="leading logged windows to leave out")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        print(
            f"error: {args.metrics} does not exist: the run wrote no metrics (see its log)", file=sys.stderr
        )
        return 1
    lines = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    try:
        s = summarise(lines, args.skip)
    except ValueError as err:
        print(f"error: {args.metrics}: {err}", file=sys.stderr)
        return 1
    verdict = "met" if s["wait_mean"] < 0.05 else "NOT met"
    print(
        "| run | steps | images/s (median) | data wait, mean / worst window | goal < 5% | device-side input |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.metrics.parent.name or args.metrics} | {s['steps'][0]}-{s['steps'][1]} ({s['windows']} windows) "
        f"| {s['images_per_s']:,.0f} | {100 * s['wait_mean']:.1f}% / {100 * s['wait_max']:.1f}% | {verdict} "
        f"| {100 * s['prep_mean']:.1f}% |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
