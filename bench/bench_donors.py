"""Cost of the FaceSwap donor source per batch: ``faceswap.donors`` = batch | bank | stream, same run, same shards.

The full torch input pipeline (``pretrain.pipelines.make_batch_pipeline`` as the engine builds it, FaceSwap at
p = 1 so every positive is swapped) on a SynthFace corpus written to a temp dir (``python -m data_shards synth``);
ms per batch for each donor source and the ratio to ``batch`` (donors from the batch's own rows, no extra reads).
``stream`` re-reads a donor set every ``--refresh`` batches in a background thread; the figure includes it.

    OMP_NUM_THREADS=1 python bench/bench_donors.py [--batches 40] [--refresh 10] [--clips 8] [--size 112]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.configio import load_config  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.pipelines import make_batch_pipeline  # noqa: E402


def ms_per_batch(url: str, args, donors: str) -> float:
    overrides = [
        f"data.url={url}", f"data.image_size={args.size}", f"augment.resize={args.size}",
        f"augment.crop={args.size * 7 // 8}", f"data.batch_clips={args.clips}", "data.num_workers=1",
        "data.prefetch=2", "device=cpu", "faceswap.p=1.0", f"faceswap.donors={donors}",
        f"faceswap.donor_refresh_steps={args.refresh}", f"faceswap.donor_bank_frames={args.frames}",
    ]  # fmt: skip
    cfg = load_config(PretrainConfig, REPO / "launch/configs/smoke.yaml", overrides)
    pipe = make_batch_pipeline(cfg, 0, 1, "cpu")
    it = iter(pipe)
    try:
        for _ in range(2):  # warm-up
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        return (time.perf_counter() - t0) * 1000 / args.batches
    finally:
        pipe.close()
        if pipe.donor_stream is not None:
            pipe.donor_stream.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--refresh", type=int, default=10, help="faceswap.donor_refresh_steps")
    ap.add_argument("--frames", type=int, default=256, help="faceswap.donor_bank_frames")
    ap.add_argument("--clips", type=int, default=8, help="data.batch_clips")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--identities", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is printed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "clips")
        subprocess.run(
            [sys.executable, "-m", "data_shards", "synth", "--out", url, "--identities", str(args.identities),
             "--clips-per-identity", "2", "--seconds", "2", "--size", str(args.size), "--seed", "0",
             "--shard-samples", "8", "--no-progress"],
            cwd=REPO, check=True,
        )  # fmt: skip
        print(f"{platform.machine()}, {os.cpu_count()} cores, torch pipeline, {args.clips} clips/batch, "
              f"{args.size} px, {args.batches} batches, refresh every {args.refresh}")  # fmt: skip
        runs: dict[str, list[float]] = {"batch": [], "bank": [], "stream": []}
        for _ in range(args.repeats):  # interleaved, median: the machine is shared
            for donors in runs:
                runs[donors].append(ms_per_batch(url, args, donors))
    results = {d: statistics.median(v) for d, v in runs.items()}
    for donors, ms in results.items():
        print(f"donors={donors:6s}  {ms:8.1f} ms/batch  x{ms / results['batch']:.2f} vs batch")


if __name__ == "__main__":
    main()
