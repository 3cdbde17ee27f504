"""Shard write and read throughput (MB/s): a local folder vs the S3 store (SeaweedFS on loopback).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_shards.py --mb 64

Both runs use the same pre-encoded 128 px JPEG clips (16 frames each), so the figures measure tar building,
hashing, publishing and reading, not JPEG encoding. The S3 store is started here and stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards import store  # noqa: E402
from data_shards.read import iter_samples, shard_urls  # noqa: E402
from data_shards.write import ShardWriter, encode_jpeg  # noqa: E402
from launch.services import ObjectStore  # noqa: E402

FRAMES_PER_CLIP = 16


def make_jpegs(count: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    jpegs = []
    for _ in range(count):
        # Smooth image + noise: JPEG sizes close to real faces (~10-20 KB at 128 px), not pure noise.
        base = (ramp[None, :, None] + ramp[:, None, None] * rng.uniform(0.2, 1.0, 3)) / 2
        image = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        jpegs.append(encode_jpeg(image, 90))
    return jpegs


def run(url: str, clips: int, jpegs: list[bytes], shard_bytes: int) -> dict[str, float]:
    start = time.perf_counter()
    with ShardWriter(
        url, "clips", "pretrain", {"bench": True}, max_samples=10**9, max_bytes=shard_bytes
    ) as writer:
        for i in range(clips):
            frames = [jpegs[(i + j) % len(jpegs)] for j in range(FRAMES_PER_CLIP)]
            meta = {
                "clip_id": f"bench-{i:06d}",
                "identity_id": f"i{i % 50}",
                "frame_indices": list(range(FRAMES_PER_CLIP)),
            }
            writer.write(f"bench-{i:06d}", frames, meta)
    write_s = time.perf_counter() - start
    total_bytes = writer.manifest["totals"]["bytes"]
    start = time.perf_counter()
    read_clips = sum(1 for shard in shard_urls(url) for _ in iter_samples(shard))
    read_s = time.perf_counter() - start
    assert read_clips == clips, (read_clips, clips)
    return {
        "MB": total_bytes / 1e6,
        "shards": writer.manifest["totals"]["shards"],
        "write_MBps": total_bytes / 1e6 / write_s,
        "read_MBps": total_bytes / 1e6 / read_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="approximate dataset size in MB")
    parser.add_argument("--shard-mb", type=float, default=16, help="shard size in MB")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    import webdataset  # noqa: F401 - imports torch (~1.5 s): keep that out of the first timing

    jpegs = make_jpegs(32, args.size)
    clip_bytes = FRAMES_PER_CLIP * (np.mean([len(j) for j in jpegs]) + 1024)
    clips = max(1, int(args.mb * 1e6 / clip_bytes))
    shard_bytes = int(args.shard_mb * 1e6)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        local = run(os.path.join(tmp, "local"), clips, jpegs, shard_bytes)
        with ObjectStore(data_dir=Path(tmp) / "store") as object_store:
            os.environ.update(object_store.env())
            s3 = run(object_store.url("bench"), clips, jpegs, shard_bytes)
    print(
        f"{clips} clips x {FRAMES_PER_CLIP} frames ({args.size} px), {local['MB']:.1f} MB in {local['shards']} shards"
    )
    print(f"{'':12s}{'local':>10s}{'s3 (SeaweedFS)':>16s}{'s3/local':>10s}")
    for key, label in (("write_MBps", "write MB/s"), ("read_MBps", "read MB/s")):
        print(f"{label:12s}{local[key]:10.1f}{s3[key]:16.1f}{s3[key] / local[key]:10.2f}")
    print(f"bytes read through data_shards.store: {store.bytes_read() / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
