"""What checking each shard's sha256 while streaming (``data.verify_sha256``) costs the shard reader.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sha256.py                    # a SynthFace dataset in a temp dir
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sha256.py --s3               # the same, read from SeaweedFS
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sha256.py --data URL         # an existing dataset

Builds a SynthFace clips dataset with ``python -m data_shards synth`` (unless ``--data``), then reads every shard
with :func:`data_shards.read.iter_samples` in three modes, interleaved, ``--repeats`` times each:

* ``off``: no sha256 (the reader before this check);
* ``buffered``: with the manifest's sha256, the default path for shards up to ``VERIFY_BUFFER_BYTES`` (64 MiB),
  read whole and checked before their first sample;
* ``streamed``: with the sha256 and ``VERIFY_BUFFER_BYTES=0``, the path of bigger shards (hashed as they stream).

It prints the median MB/s per mode and each checked mode's throughput as a fraction of ``off``. Local shards sit
in the page cache after the first pass, so the local figure is the CPU cost alone, the worst case for the ratio;
``--s3`` adds the object store's network path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards import read as shard_read  # noqa: E402
from data_shards import store  # noqa: E402
from data_shards.read import iter_samples, read_manifest, shard_urls  # noqa: E402

MODES = ("off", "buffered", "streamed")


def synth(out: str, args) -> None:
    cmd = [
        sys.executable, "-m", "data_shards", "synth", "--out", out, "--identities", str(args.identities),
        "--clips-per-identity", str(args.clips_per_identity), "--seconds", str(args.seconds), "--seed", "0",
        "--size", str(args.size), "--shard-samples", str(args.shard_samples), "--no-progress",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_all(url: str, manifest: dict, mode: str) -> tuple[float, int]:
    """Seconds to read every sample of the dataset in ``mode``, and the samples read."""
    saved = shard_read.VERIFY_BUFFER_BYTES
    if mode == "streamed":
        shard_read.VERIFY_BUFFER_BYTES = 0
    try:
        start = time.perf_counter()
        samples = 0
        for entry, shard in zip(manifest["shards"], shard_urls(url, manifest)):
            sha = None if mode == "off" else entry["sha256"]
            samples += sum(1 for _ in iter_samples(shard, sha256=sha))
        return time.perf_counter() - start, samples
    finally:
        shard_read.VERIFY_BUFFER_BYTES = saved


def hashlib_mbps(mb: int = 256) -> float:
    data = os.urandom(mb << 20)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / 1e6 / (time.perf_counter() - start)


def measure(url: str, repeats: int) -> dict[str, float]:
    manifest = read_manifest(url)
    total = manifest["totals"]["bytes"]
    read_all(url, manifest, "off")  # warm: page cache, imports
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved, so background load hits every mode alike
            seconds, samples = read_all(url, manifest, mode)
            assert samples == manifest["totals"]["samples"], (mode, samples)
            times[mode].append(seconds)
    return {m: total / 1e6 / statistics.median(t) for m, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", help="an existing dataset (folder or s3:// prefix); default: build SynthFace"
    )
    parser.add_argument("--s3", action="store_true", help="also read it from a local SeaweedFS store")
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--clips-per-identity", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--shard-samples", type=int, default=16, help="clips per shard")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import webdataset  # noqa: F401 - imports torch (~1.5 s): keep that out of the first timing

    with tempfile.TemporaryDirectory(prefix="bench-sha256-") as tmp:
        url = args.data
        if url is None:
            url = str(Path(tmp) / "synth")
            synth(url, args)
        manifest = read_manifest(url)
        totals = manifest["totals"]
        print(
            f"dataset {url}: {totals['shards']} shards, {totals['samples']} clips, {totals['frames']} frames, "
            f"{totals['bytes'] / 1e6:.1f} MB ({totals['bytes'] / totals['shards'] / 1e6:.2f} MB per shard)"
        )
        print(f"sha256 alone (hashlib, one 256 MiB buffer): {hashlib_mbps():.0f} MB/s")
        targets = [("local", url)]
        object_store = None
        if args.s3:
            from launch.services import ObjectStore

            object_store = ObjectStore(data_dir=Path(tmp) / "store").start()
            os.environ.update(object_store.env())
            s3_url = object_store.url("bench-sha256")
            for entry in manifest["shards"]:
                store.put_file(store.join(url, entry["name"]), store.join(s3_url, entry["name"]))
            store.put_file(store.join(url, "manifest.json"), store.join(s3_url, "manifest.json"))
            targets.append(("s3", s3_url))
        try:
            for where, target in targets:
                mbps = measure(target, args.repeats)
                line = ", ".join(f"{m} {mbps[m]:.0f} MB/s" for m in MODES)
                ratios = ", ".join(f"{m}/off {mbps[m] / mbps['off']:.3f}" for m in MODES[1:])
                print(f"{where}: read {line}; {ratios}")
        finally:
            if object_store is not None:
                object_store.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
