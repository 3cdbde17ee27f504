"""Peak memory and throughput of evaluation features: streamed (``eval/stream.py``) vs in memory, by dataset size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eval_stream.py [--synthface] [--sizes 10000,100000]

Writes ``frames`` datasets of each size once: SynthFace eval frames (``--synthface``: ``python -m
data_shards evalset --source synth``, 128 px) or toy frames (``eval.data.write_toy_frames``, ``--image-size``
px), then measures, each in a fresh process so that peak RSS (``ru_maxrss``) is one path's at one size:
* stream: ``stream_features`` (features + labels from the store, one chunk of JPEGs at a time);
* in memory: ``load_frames`` (every JPEG in a list, as one Ray object holds it) + ``extract_features``.
Prints peak RSS per path and size, the largest/smallest size ratio per path (goal for streaming: <= 1.3), and
images/s. Features: ResNet-18 width 8 at 32 px crops (after a resize to 40 px), batch 256, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(path: str, url: str, ckpt: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import resource

    from eval.features import FeatureConfig

    cfg = FeatureConfig(resize=40, crop=32, batch_size=256, match_run=False)
    start = time.perf_counter()
    if path == "stream":
        from eval.stream import stream_features

        out = stream_features(ckpt, url, cfg)
        n, dim = out.features.shape
    else:
        from eval.data import load_frames
        from eval.features import extract_features

        data = load_frames(url)
        feats = extract_features(ckpt, data.jpegs, cfg)
        n, dim = feats.shape
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps({"path": path, "frames": n, "dim": dim, "seconds": seconds, "peak_mib": peak_kib / 1024})
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="frames per dataset, comma-separated")
    parser.add_argument("--out", default="runs/bench_eval_stream", help="where the toy datasets are kept")
    parser.add_argument("--image-size", type=int, default=128, help="stored frame side (SynthFace: 128)")
    parser.add_argument(
        "--synthface",
        action="store_true",
        help="SynthFace eval frames (data_shards evalset) instead of toy frames",
    )
    parser.add_argument("--child", nargs=3, metavar=("PATH", "URL", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    import torch

    from eval.data import write_toy_frames
    from pretrain.model import ModelConfig, build_backbone, save_backbone

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = save_backbone(build_backbone(ModelConfig(arch="resnet18", width=8)), out / "backbone.pt")
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict[int, dict]] = {"stream": {}, "memory": {}}
    for size in sizes:
        url = out / (f"synthface-{size}" if args.synthface else f"toy-{size}-{args.image_size}px")
        if not (url / "manifest.json").is_file():
            t0 = time.perf_counter()
            if args.synthface:  # 4 clips x 8 frames per identity
                subprocess.run(
                    [sys.executable, "-m", "data_shards", "evalset", "--source", "synth", "--out", str(url),
                     "--identities", str(max(2, size // 32)), "--clips-per-identity", "4", "--seconds", "12",
                     "--frames-per-clip", "8", "--seed", "0", "--no-progress"],
                    cwd=REPO, check=True,
                )  # fmt: skip
            else:
                ids = max(2, size // 100)
                write_toy_frames(str(url), identities=ids, per_identity=size // ids, size=args.image_size)
            print(f"wrote {url} ({size} frames) in {time.perf_counter() - t0:.0f} s", flush=True)
        for path in ("stream", "memory"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", path, str(url), str(ckpt)],
                cwd=REPO, capture_output=True, text=True, check=True,
            )  # fmt: skip
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results[path][size] = row
            print(f"{path:>6} {row['frames']:>7} frames: peak RSS {row['peak_mib']:7.0f} MiB, "
                  f"{row['frames'] / row['seconds']:6.0f} images/s", flush=True)  # fmt: skip
    lo, hi = min(sizes), max(sizes)
    for path in ("stream", "memory"):
        ratio = results[path][hi]["peak_mib"] / results[path][lo]["peak_mib"]
        goal = " (goal <= 1.3)" if path == "stream" else ""
        print(f"{path}: peak RSS at {hi} / at {lo} frames = {ratio:.2f}{goal}")
    speed = (results["stream"][hi]["frames"] / results["stream"][hi]["seconds"]) / (
        results["memory"][hi]["frames"] / results["memory"][hi]["seconds"]
    )
    print(f"throughput stream / in memory at {hi} frames: {speed:.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
