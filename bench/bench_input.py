"""Input-path throughput, measured side by side in one run, on the same JPEG files.

Work per frame (as in the [A, NA, P, NP] batch, where every view is its own frame): read the JPEG file, decode,
landmark mask, resize/crop/flip, colour jitter, blur, grayscale, normalise; half the frames get the first view
family (anchors), half the second (positives). Paths:

* ``dali-cpu``: pretrain.pipelines.dali_graph on the CPU (``num_threads`` DALI threads);
* ``torch-batched``: pretrain.decode + pretrain.augment.ViewAugmenter (torch intra-op threads);
* ``torchvision``: PIL + torchvision.transforms per sample in a DataLoader (``threads`` workers; 0 for 1 thread),
  the plain baseline; its mask is a PIL ellipse.

Then FaceSwap: the per-sample NumPy/SciPy recipe (``face_swap_reference``, the classic OpenCV-style loop) against
the batched torch version on the same pairs.

Then (``--parts shapes``) FaceSwap and one view family with static shapes (``data.shapes=static``: every row
computed, no value read back to the host - the CUDA default) against dynamic ones (only the rows that drew an
op - the CPU default), on ``--device``.

Then the **full pretraining input path** (``data.pipeline`` = torch | dali | torchvision, built by
``pretrain.pipelines.make_batch_pipeline`` exactly as the engine builds it) on the same SynthFace clip shards
written to a temp dir: ClipStream from the shards -> TimeAug/HardNeg frame choice -> decode -> FaceSwap of the
positives -> two-family augmentation -> mouth-eye descriptors, ``[A, NA, P, NP]`` batches of ``--clips`` clips;
images/s and ratios against the torchvision DataLoader baseline. Last, the same torch path with per-frame
landmark detection (``data_shards.faces.FaceAligner``: dlib HOG + 68-point predictor on every decoded frame in the
loader threads, as the original code did, with its one HOG upsampling pass, ``--dlib-upsample``) against
landmarks read from the shards.

    OMP_NUM_THREADS=1 python bench/bench_input.py [--frames 512] [--batch 64] [--threads 1 2] [--clips 16]
        [--parts views faceswap shapes full] [--device cpu|cuda] [--no-extras] [--dlib-upsample 1]

``--threads N`` pins each measurement to the first N cores (every thread and worker process of every path),
so all paths get the same hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.augment import AugmentConfig, ViewAugmenter  # noqa: E402
from pretrain.decode import decode_jpegs  # noqa: E402
from pretrain.faceswap import FaceSwapConfig, face_swap, face_swap_reference, toy_faces  # noqa: E402


def make_frames(directory: Path, count: int, seed: int) -> tuple[list[Path], np.ndarray]:
    """128 px JPEG faces (SynthFace when installed, else toy faces) written to files, with landmarks."""
    images, landmarks = toy_faces(count, 128, torch.Generator().manual_seed(seed))
    origin = "toy faces"
    try:
        from data_shards.synth import SynthConfig, iter_clips

        frames, lms = [], []
        for clip in iter_clips(SynthConfig()):
            frames += list(clip.frames)
            lms += list(np.asarray(clip.meta["landmarks"], np.float32))
            if len(frames) >= count:
                break
        if len(frames) >= count and frames[0].shape == (128, 128, 3):
            images = torch.from_numpy(np.stack(frames[:count])).permute(0, 3, 1, 2)
            landmarks, origin = torch.from_numpy(np.stack(lms[:count])), "SynthFace"
    except Exception:  # noqa: BLE001 - any problem with the optional generator: fall back to toy faces
        pass
    paths = []
    for i, array in enumerate(images.permute(0, 2, 3, 1).numpy()):
        path = directory / f"{i:05d}.jpg"
        Image.fromarray(array).save(path, format="JPEG", quality=90)
        paths.append(path)
    print(
        f"frames: {count} x 128 px JPEG from {origin}, {sum(p.stat().st_size for p in paths) / count:.0f} B avg"
    )
    return paths, landmarks.numpy()


@contextlib.contextmanager
def pinned_to(threads: int):
    """Run the block on the first ``threads`` CPU cores only: every existing thread of this process is pinned
    now and threads or DataLoader worker processes started inside inherit it, so each path gets exactly the
    same cores, however many threads or processes it starts (a DataLoader worker otherwise adds a core)."""
    before = os.sched_getaffinity(0)
    cores = set(sorted(before)[:threads])

    def pin_all(target: set[int]) -> None:
        for task in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(task), target)
            except OSError:  # a thread that ended meanwhile
                pass

    pin_all(cores)
    try:
        yield sorted(cores)
    finally:
        pin_all(before)


def best_rate(epoch, repeats: int) -> float:
    """Items/s of the fastest of ``repeats`` epochs: the machine is shared, the best run is the least disturbed."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = epoch()
        best = max(best, n / (time.perf_counter() - start))
    return best


class FileBatches:
    """Re-iterable (jpegs, landmarks, families) batches read from the files at iteration time."""

    def __init__(self, paths: list[Path], landmarks: np.ndarray, batch: int):
        self.paths, self.landmarks, self.batch = paths, landmarks, batch

    def __iter__(self):
        for start in range(0, len(self.paths), self.batch):
            idx = range(start, min(start + self.batch, len(self.paths)))
            families = np.array([0 if i < start + len(idx) / 2 else 1 for i in idx])
            yield [self.paths[i].read_bytes() for i in idx], self.landmarks[list(idx)], families


def bench_dali(paths, landmarks, batch: int, threads: int, repeats: int) -> float:
    from pretrain.pipelines.dali_graph import build_dali_pipeline, dali_iterator

    source = FileBatches(paths, landmarks, batch)
    it = dali_iterator(build_dali_pipeline(AugmentConfig(), "cpu", batch, threads, None, 0, source))
    for _ in it:  # warm-up epoch (allocations, thread pool)
        pass
    best = 0.0
    for _ in range(repeats):
        it.reset()
        start, n = time.perf_counter(), 0
        for out in it:
            n += out[0]["images"].shape[0]
        best = max(best, n / (time.perf_counter() - start))
    return best


def bench_torch(paths, landmarks, batch: int, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    aug = ViewAugmenter(AugmentConfig())
    gen = torch.Generator().manual_seed(0)
    lm = torch.from_numpy(landmarks)

    def epoch() -> int:
        n = 0
        for jpegs, _, _ in FileBatches(paths, landmarks, batch):
            images = decode_jpegs(jpegs)
            half = images.shape[0] // 2
            rows = slice(n, n + images.shape[0])
            aug(images[:half], lm[rows][:half], "first", gen)
            aug(images[half:], lm[rows][half:], "second", gen)
            n += images.shape[0]
        return n

    epoch()
    return best_rate(epoch, repeats)


class TorchvisionFrames(torch.utils.data.Dataset):
    """The plain baseline: one PIL image at a time through the torchvision transforms of data.pipeline=torchvision."""

    def __init__(self, paths, landmarks, batch: int, cfg: AugmentConfig):
        from pretrain.pipelines.torchvision_pipeline import TorchvisionViews

        self.paths, self.landmarks, self.batch, self.cfg = paths, landmarks, batch, cfg
        self.views = TorchvisionViews(cfg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = Image.open(self.paths[i]).convert("RGB")
        first = (i % self.batch) < self.batch // 2
        return self.views(image, self.landmarks[i], "first" if first else "second", np.random.default_rng())


def bench_torchvision(paths, landmarks, batch: int, threads: int, repeats: int) -> float:
    torch.set_num_threads(1)
    data = TorchvisionFrames(paths, landmarks, batch, AugmentConfig())
    workers = 0 if threads == 1 else threads
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, num_workers=workers, persistent_workers=workers > 0
    )
    for _ in loader:
        pass
    return best_rate(lambda: sum(images.shape[0] for images in loader), repeats)


def bench_faceswap(pairs: int, threads: int, repeats: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    images, lm = toy_faces(2 * pairs, 128, torch.Generator().manual_seed(1))
    cfg = FaceSwapConfig()
    src, dst = images[:pairs].float(), images[pairs:].float()

    def one(i: int) -> None:
        face_swap_reference(
            src[i].permute(1, 2, 0).double().numpy(), lm[i].double().numpy(),
            dst[i].permute(1, 2, 0).double().numpy(), lm[pairs + i].double().numpy(), cfg,
        )  # fmt: skip

    def per_sample() -> int:
        for i in range(pairs):
            one(i)
        return pairs

    def batched() -> int:
        face_swap(src, lm[:pairs], dst, lm[pairs:], cfg)
        return pairs

    one(0)  # warm-up (scipy imports)
    face_swap(src[:4], lm[:4], dst[:4], lm[pairs : pairs + 4], cfg)
    return best_rate(per_sample, repeats), best_rate(batched, repeats)


def make_shards(url: str, clips: int) -> str:
    """SynthFace clips (128 px, ~8 s at 25/6 fps) as clip shards with manifest, written with ShardWriter."""
    from data_shards.synth import SynthConfig, iter_clips
    from data_shards.write import ShardWriter

    cfg = SynthConfig(identities=max(2, clips // 2), clips_per_identity=2, seconds=8.0, size=128, seed=0)
    frames = 0
    with ShardWriter(url, kind="clips", split="pretrain", generator={"bench": True}, max_samples=4) as w:
        for clip in iter_clips(cfg):
            w.write_clip(clip)
            frames += len(clip.frames)
    print(
        f"shards: {cfg.identities * cfg.clips_per_identity} SynthFace clips, {frames} frames of 128 px at {url}"
    )
    return url


def _pipeline_cfg(url: str, kind: str, clips: int, threads: int, device: str = "cpu"):
    from common.configio import load_config
    from pretrain.config import PretrainConfig

    return load_config(
        PretrainConfig,
        None,
        [f"data.url={url}", f"data.pipeline={kind}", f"data.batch_clips={clips}", f"data.num_workers={threads}",
         "data.prefetch=4", "data.shuffle_buffer=16", f"device={device}", "data.equalize=repeat"],
    )  # fmt: skip


def bench_full(pipeline, batches: int) -> float:
    """Steady-state images/s over ``batches`` batches. The warm-up first takes as many batches as the pipeline
    can hold ready (``data.prefetch`` + 2), so the timed window measures production, not a queue filled while
    the first batch was awaited; pipelines cycle epochs as in training."""
    it = iter(pipeline)
    try:
        for _ in range(pipeline.data.prefetch + 2):
            next(it)
        _sync(pipeline.device)
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            images += next(it).images.shape[0]
        _sync(pipeline.device)  # device work is queued asynchronously: count it inside the window
        return images / (time.perf_counter() - start)
    finally:
        pipeline.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DetectingPipeline:
    """Factory: the torch pipeline whose loader threads detect landmarks on every decoded frame (dlib)."""

    @staticmethod
    def build(cfg, upsample: int):
        from data_shards.faces import FaceAligner, FaceConfig
        from pretrain.pipelines.torch_pipeline import TorchBatchPipeline

        local = threading.local()
        found = [0, 0]

        class Detecting(TorchBatchPipeline):
            def prepare(self, group):
                host = super().prepare(group)
                aligner = getattr(local, "aligner", None)
                if aligner is None:
                    # one per thread (dlib is not thread-safe)
                    aligner = local.aligner = FaceAligner(FaceConfig(upsample=upsample))
                rows = [s["frames"][c[block]] for block in range(self.rows_per_clip)
                        for s, c in zip(group.samples, group.choices)]  # fmt: skip
                for r, jpeg in enumerate(rows):
                    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
                    boxes = aligner.detect(rgb)
                    found[1] += 1
                    if boxes:
                        found[0] += 1
                        host.landmarks[r] = torch.from_numpy(aligner.landmarks(rgb, boxes[0])).float()
                return host

        pipe = Detecting(cfg, 0, 1, "cpu")
        pipe.found = found
        return pipe


def bench_local_vs_s3(local_rate: float, args, threads: int, tmp: Path) -> None:
    """The same full torch input path reading its shards from the real local S3 store (SeaweedFS)."""
    from launch.services import ObjectStore
    from pretrain.pipelines import make_batch_pipeline

    with ObjectStore(data_dir=tmp / "store") as store:
        saved = {k: os.environ.get(k) for k in store.env()}
        os.environ.update(store.env())
        try:
            url = make_shards(store.url("bench/clips"), 2 * args.clips)
            cfg = _pipeline_cfg(url, "torch", args.clips, threads)
            s3_rate = bench_full(make_batch_pipeline(cfg, 0, 1, "cpu"), args.full_batches)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    print(
        f"\nshards from local disk vs the local S3 store (torch path, {threads} threads), images/s: "
        f"local {local_rate:.0f}, S3 {s3_rate:.0f} -> S3/local {s3_rate / local_rate:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--swap-pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per path; the best is reported")
    parser.add_argument(
        "--clips", type=int, default=16, help="clips per batch in the full input path (4x images)"
    )
    parser.add_argument(
        "--parts", nargs="+", default=["views", "faceswap", "shapes", "full"],
        choices=["views", "faceswap", "shapes", "full"],
    )  # fmt: skip
    parser.add_argument("--full-batches", type=int, default=12, help="timed batches per full-path pipeline")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"],
        help="where the full path's torch and DALI pipelines finish batches (cuda: nvJPEG decode, the GPU goal)",
    )  # fmt: skip
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="full part: skip local-vs-S3 and the per-frame dlib comparison",
    )
    parser.add_argument(
        "--dlib-upsample", type=int, default=1,
        help="HOG upsampling of the per-frame dlib baseline; 1 as the original SSL-FER code, detector(image, 1)",
    )  # fmt: skip
    args = parser.parse_args()

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"python={platform.python_version()} torch={torch.__version__} cuda={torch.cuda.is_available()}"
    )
    if "views" in args.parts:
        run_views(args)
    if "faceswap" in args.parts:
        run_faceswap(args)
    if "shapes" in args.parts:
        run_shapes(args)
    if "full" in args.parts:
        run_full(args)


def run_views(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths, landmarks = make_frames(Path(tmp), args.frames, seed=0)
        print(
            f"\ninput path, frames/s (decode + one augmented view per frame, batch {args.batch}, best of {args.repeats}):"
        )
        print(
            f"{'cores':>8} {'dali-cpu':>10} {'torch-batched':>14} {'torchvision':>12} {'dali/tv':>8} {'torch/tv':>9}"
        )
        for threads in args.threads:
            with pinned_to(threads):
                dali = bench_dali(paths, landmarks, args.batch, threads, args.repeats)
                batched = bench_torch(paths, landmarks, args.batch, threads, args.repeats)
                baseline = bench_torchvision(paths, landmarks, args.batch, threads, args.repeats)
            print(
                f"{threads:>8} {dali:>10.0f} {batched:>14.0f} {baseline:>12.0f} "
                f"{dali / baseline:>7.2f}x {batched / baseline:>8.2f}x"
            )


def run_faceswap(args) -> None:
    print(f"\nfaceswap, pairs/s ({args.swap_pairs} pairs, 128 px):")
    print(f"{'threads':>8} {'per-sample':>11} {'batched':>9} {'ratio':>7}")
    for threads in args.threads:
        reference, batched = bench_faceswap(args.swap_pairs, threads, args.repeats)
        print(f"{threads:>8} {reference:>11.1f} {batched:>9.1f} {batched / reference:>6.1f}x")


def run_shapes(args) -> None:
    """data.shapes: the device-side ops with static shapes (no host reads; the CUDA default) vs dynamic."""
    from pretrain.augment import AugmentConfig, ViewAugmenter
    from pretrain.faceswap import FaceSwap, FaceSwapConfig, toy_faces

    device = torch.device(args.device)
    n = args.batch
    images, landmarks = (t.to(device) for t in toy_faces(n, 128, torch.Generator().manual_seed(0)))
    identity = torch.arange(n, device=device)

    def swap_call(static: bool):
        swap, gen = (
            FaceSwap(FaceSwapConfig(p=0.8), static=static),
            torch.Generator(device=device).manual_seed(0),
        )
        return lambda: swap(images[n // 2 :], landmarks[n // 2 :], identity[n // 2 :], gen,
                            donor_images=images, donor_landmarks=landmarks, donor_identity=identity)  # fmt: skip

    def views_call(static: bool):
        aug, gen = (
            ViewAugmenter(AugmentConfig(), static=static),
            torch.Generator(device=device).manual_seed(0),
        )
        return lambda: aug(images, landmarks, "first", gen)

    def ms_per_call(fn, calls: int = 4) -> float:
        def epoch() -> int:
            for _ in range(calls):
                fn()
            _sync(device)
            return calls

        epoch()  # warm-up
        return 1e3 / best_rate(epoch, args.repeats)

    print(
        f"\nshapes on {device}, ms per call ({n // 2} positives, FaceSwap p = 0.8; {n} views of one family):"
    )
    print(f"{'threads':>8} {'swap dyn':>9} {'swap static':>12} {'views dyn':>10} {'views static':>13}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        with pinned_to(threads):
            row = [ms_per_call(make(static)) for make in (swap_call, views_call) for static in (False, True)]
        print(f"{threads:>8} {row[0]:>9.1f} {row[1]:>12.1f} {row[2]:>10.1f} {row[3]:>13.1f}")


def run_full(args) -> None:
    from pretrain.pipelines import make_batch_pipeline

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    kinds = ["torch", "dali", "torchvision"] if dali_available() else ["torch", "torchvision"]
    with tempfile.TemporaryDirectory() as tmp:
        url = make_shards(str(Path(tmp) / "clips"), 2 * args.clips)
        print(
            f"\nfull input path on {device}, images/s (shards -> sampling -> decode -> FaceSwap -> 2-family "
            f"augmentation -> descriptors; {args.clips} clips = {4 * args.clips} images per batch, "
            f"{args.full_batches} batches; every image is one {_crop()}-px view):"
        )
        print(f"{'cores':>8} {'torch':>8} {'dali':>8} {'torchvision':>12} {'torch/tv':>9} {'dali/tv':>8}")
        for threads in args.threads:
            rates = {"dali": float("nan")}
            for kind in kinds:
                # On a CPU device the pipeline's `threads` worker threads each finish whole batches (and the
                # DataLoader's worker processes each run one): one intra-op thread each, as a CPU rank runs
                # (OMP_NUM_THREADS=1); more would oversubscribe the cores (measured: up to ~3x slower).
                torch.set_num_threads(1)
                with pinned_to(threads):
                    cfg = _pipeline_cfg(url, kind, args.clips, threads, device)
                    rates[kind] = bench_full(make_batch_pipeline(cfg, 0, 1, device), args.full_batches)
            tv = rates["torchvision"]
            print(
                f"{threads:>8} {rates['torch']:>8.0f} {rates['dali']:>8.0f} {tv:>12.0f} "
                f"{rates['torch'] / tv:>8.2f}x {rates['dali'] / tv:>7.2f}x   quadruples/s (A, NA, P, NP): "
                f"{rates['torch'] / 4:.0f} / {rates['dali'] / 4:.0f} / {tv / 4:.0f}"
            )
            if device == "cuda":
                best = max(
                    rate for rate in (rates["torch"], rates["dali"]) if not math.isnan(rate)
                )  # no DALI: nan
                print(f"{'':>8} views/s on one GPU: {best:,.0f} (goal >= 20,000 per H200)")
        if args.no_extras:
            return
        threads = max(args.threads)
        torch.set_num_threads(1)
        cfg = _pipeline_cfg(url, "torch", args.clips, threads)
        with pinned_to(threads):
            stored = bench_full(make_batch_pipeline(cfg, 0, 1, "cpu"), args.full_batches)
            bench_local_vs_s3(stored, args, threads, Path(tmp))
            try:
                detecting = DetectingPipeline.build(cfg, args.dlib_upsample)
            except Exception as err:  # noqa: BLE001 - dlib or its model missing: say so, do not fail the bench
                print(f"\nper-frame landmark detection: skipped ({err})")
                return
            detect = bench_full(detecting, max(2, args.full_batches // 3))
        hits, total = detecting.found
        print(
            f"\nlandmarks, full torch path, {threads} cores, images/s: stored in the shards {stored:.0f}, "
            f"dlib (upsample {args.dlib_upsample}) on every frame {detect:.1f} "
            f"(faces found on {hits}/{total} frames) -> stored is "
            f"{stored / detect:.1f}x faster"
        )
        bench_landmark_stage(url, args.dlib_upsample)


def _crop() -> int:
    from pretrain.augment import AugmentConfig

    return AugmentConfig().crop


def bench_landmark_stage(url: str, upsample: int, frames: int = 64) -> None:
    """The landmark step alone, per frame, on one core: dlib HOG detection + 68-point fit on the decoded frame
    vs reading the shard's landmarks (landmarks.npy, and the JSON lists older shards carried)."""
    import json

    from data_shards.faces import FaceAligner, FaceConfig
    from data_shards.read import iter_samples

    clips = [s for _, s in zip(range(8), iter_samples(store_first_shard(url)))]
    npy = [c["meta"]["landmarks"] for c in clips]
    as_json = [json.dumps({"landmarks": np.round(lm, 2).tolist()}) for lm in npy]
    per_clip = sum(len(c["frames"]) for c in clips)
    with pinned_to(1):
        buffers = []
        for lm in npy:
            buffer = io.BytesIO()
            np.save(buffer, lm)
            buffers.append(buffer.getvalue())
        start = time.perf_counter()
        for _ in range(20):
            for data in buffers:
                np.load(io.BytesIO(data))
        npy_s = (time.perf_counter() - start) / (20 * per_clip)
        start = time.perf_counter()
        for _ in range(5):
            for text in as_json:
                np.asarray(json.loads(text)["landmarks"], np.float32)
        json_s = (time.perf_counter() - start) / (5 * per_clip)
        aligner = FaceAligner(FaceConfig(upsample=upsample))
        images = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for c in clips for f in c["frames"]][
            :frames
        ]
        start = time.perf_counter()
        for rgb in images:
            boxes = aligner.detect(rgb)
            if boxes:
                aligner.landmarks(rgb, boxes[0])
        dlib_s = (time.perf_counter() - start) / len(images)
    print(
        f"landmark step alone, per frame, 1 core: dlib detection (upsample {upsample}) + 68 points "
        f"{dlib_s * 1e3:.2f} ms, "
        f"JSON lists {json_s * 1e6:.1f} us, landmarks.npy {npy_s * 1e6:.2f} us -> landmarks.npy is "
        f"{dlib_s / npy_s:,.0f}x faster than dlib ({dlib_s / json_s:,.0f}x for JSON)"
    )


def store_first_shard(url: str) -> str:
    from data_shards.read import shard_urls

    return shard_urls(url)[0]


if __name__ == "__main__":
    main()
