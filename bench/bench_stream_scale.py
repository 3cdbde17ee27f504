"""The clip stream planned for a large cluster, simulated: 100,000 shards over 1,024 ranks x 8 workers.

    python bench/bench_stream_scale.py [--shards 100000] [--ranks 1024] [--workers 8] [--epochs 2]

Nothing is read: a manifest of ``--shards`` shards (sample counts drawn like a real corpus: 50-250 clips per
shard) is written to a temporary folder, then it measures
* start-up: parsing that manifest (``pretrain.dataset.open_dataset``) and building one rank's ``ClipStream``,
  time and peak Python memory;
* the per-epoch split: clips each rank's shards hold (balance = max / min over ranks), and the batches per rank
  each epoch (``epoch_length`` x workers: the same number on every rank, or collectives would hang);
* the same with ``data.resampled`` (shards drawn with replacement per lane).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.dataset import open_dataset  # noqa: E402
from pretrain.stream import ClipStream  # noqa: E402


def write_manifest(folder: Path, shards: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(50, 251, size=shards)
    entries = [
        {"name": f"shard-{i:06d}.tar", "samples": int(c), "frames": int(c) * 50, "bytes": int(c) * 500_000,
         "sha256": f"{i:064x}"}
        for i, c in enumerate(counts)
    ]  # fmt: skip
    manifest = {
        "format_version": 1,
        "kind": "clips",
        "split": "pretrain",
        "generator": {"fps": 25 / 6},
        "shards": entries,
        "totals": {"shards": shards, "samples": int(counts.sum()), "frames": int(counts.sum()) * 50},
        "identities": 0,
        "skipped": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def rank_clips(stream: ClipStream, epoch: int, rank: int, workers: int) -> int:
    return sum(stream.sample_counts[s] for w in range(workers) for s in stream._lane_shards(epoch, rank, w))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_manifest(folder, args.shards, args.seed)
        size_mb = (folder / "manifest.json").stat().st_size / 2**20
        tracemalloc.start()
        started = time.perf_counter()
        dataset = open_dataset(str(folder))
        opened = time.perf_counter()
        stream = ClipStream(
            list(dataset.shard_urls), list(dataset.sample_counts), 0, args.ranks, args.workers, args.seed
        )
        built = time.perf_counter()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(
            f"manifest: {args.shards} shards, {sum(dataset.sample_counts):,} clips, {size_mb:.1f} MB; "
            f"open_dataset {opened - started:.2f} s, one rank's ClipStream {built - opened:.3f} s, "
            f"peak Python memory {peak / 2**20:.0f} MB"
        )
        for resampled in (False, True):
            stream = ClipStream(
                list(dataset.shard_urls), list(dataset.sample_counts), 0, args.ranks, args.workers, args.seed,
                resampled=resampled,
            )  # fmt: skip
            for epoch in range(args.epochs):
                t0 = time.perf_counter()
                length = stream.epoch_length(epoch)
                planned = time.perf_counter() - t0
                label = "resampled" if resampled else "split"
                if resampled:
                    print(
                        f"{label} epoch {epoch}: every lane draws {length} clips -> {length * args.workers} per "
                        f"rank on all {args.ranks} ranks (equal by construction); plan {planned:.2f} s"
                    )
                    continue
                clips = np.array([rank_clips(stream, epoch, r, args.workers) for r in range(args.ranks)])
                print(
                    f"{label} epoch {epoch}: clips held per rank min {clips.min()} / max {clips.max()} "
                    f"(balance {clips.max() / clips.min():.3f}); batches-equal length {length} per lane x "
                    f"{args.workers} workers = {length * args.workers} clips on every rank "
                    f"({length * args.workers * args.ranks / clips.sum():.1%} of the epoch's clips used with "
                    f"equalize=drop); plan {planned:.2f} s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
