"""SynthFace throughput: rendered frames per second on one core.

OMP_NUM_THREADS=1 .venv/bin/python bench/bench_synth.py [--clips 6] [--seconds 10] [--size 128]
"""

from __future__ import annotations

import argparse
import time

from data_shards.synth import SynthConfig, iter_clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = SynthConfig(
        identities=args.clips, clips_per_identity=1, seconds=args.seconds, seed=args.seed, size=args.size
    )
    start = time.perf_counter()
    frames = sum(len(clip.frames) for clip in iter_clips(cfg))
    elapsed = time.perf_counter() - start
    print(
        f"synth: {frames} frames at {args.size}px in {elapsed:.2f} s = {frames / elapsed:.0f} frames/s (one core)"
    )


if __name__ == "__main__":
    main()
