"""Input-path throughput, measured side by side in one run, on the same JPEG files.

Work per frame (as in the [A, NA, P, NP] batch, where every view is its own frame): read the JPEG file, decode,
landmark mask, resize/crop/flip, colour jitter, blur, grayscale, normalise; half the frames get the first view
family (anchors), half the second (positives). Paths:

* ``dali-cpu``: pretrain.dali_pipeline on the CPU (``num_threads`` DALI threads);
* ``torch-batched``: pretrain.decode + pretrain.augment.ViewAugmenter (torch intra-op threads);
* ``torchvision``: PIL + torchvision.transforms per sample in a DataLoader (``threads`` workers; 0 for 1 thread),
  the plain baseline; its mask is a PIL ellipse.

Then FaceSwap: the per-sample NumPy/SciPy recipe (``face_swap_reference``, the classic OpenCV-style loop) against
the batched torch version on the same pairs.

    python bench/bench_input.py [--frames 512] [--batch 64] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.augment import MASK_REGIONS, AugmentConfig, ViewAugmenter  # noqa: E402
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
    from pretrain.dali_pipeline import build_dali_pipeline, dali_iterator

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
    """The plain baseline: one PIL image at a time through torchvision transforms."""

    def __init__(self, paths, landmarks, batch: int, cfg: AugmentConfig):
        from torchvision import transforms as T

        self.paths, self.landmarks, self.batch, self.cfg = paths, landmarks, batch, cfg
        b, c, s, h = cfg.jitter
        tail = [
            T.RandomGrayscale(cfg.gray_p),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
        blur = T.RandomApply(
            [T.GaussianBlur(2 * int(3 * cfg.blur_sigma[1]) + 1, cfg.blur_sigma)], p=cfg.blur_p
        )
        head = [T.Resize(cfg.resize), T.RandomCrop(cfg.crop), T.RandomHorizontalFlip(cfg.flip_p)]
        self.first = T.Compose([*head, T.ColorJitter(b, c, s, h), blur, *tail])
        self.second = T.Compose(
            [*head, T.RandomApply([T.ColorJitter(b, c, s, h)], p=cfg.jitter_p), blur, *tail]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = Image.open(self.paths[i]).convert("RGB")
        if np.random.rand() < self.cfg.mask_p:
            pts = self.landmarks[i][list(MASK_REGIONS[np.random.randint(3)])]
            lo, hi = pts.min(0), pts.max(0)
            centre, half = (lo + hi) / 2, (hi - lo) / 2 * self.cfg.mask_scale
            half[1] = max(half[1], half[0] * self.cfg.mask_min_aspect)
            mean = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))
            ImageDraw.Draw(image).ellipse([*(centre - half), *(centre + half)], fill=mean)
        first = (i % self.batch) < self.batch // 2
        return (self.first if first else self.second)(image)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--swap-pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per path; the best is reported")
    args = parser.parse_args()

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"python={platform.python_version()} torch={torch.__version__} cuda={torch.cuda.is_available()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths, landmarks = make_frames(Path(tmp), args.frames, seed=0)
        print(
            f"\ninput path, frames/s (decode + one augmented view per frame, batch {args.batch}, best of {args.repeats}):"
        )
        print(
            f"{'threads':>8} {'dali-cpu':>10} {'torch-batched':>14} {'torchvision':>12} {'dali/tv':>8} {'torch/tv':>9}"
        )
        for threads in args.threads:
            dali = bench_dali(paths, landmarks, args.batch, threads, args.repeats)
            batched = bench_torch(paths, landmarks, args.batch, threads, args.repeats)
            baseline = bench_torchvision(paths, landmarks, args.batch, threads, args.repeats)
            print(
                f"{threads:>8} {dali:>10.0f} {batched:>14.0f} {baseline:>12.0f} "
                f"{dali / baseline:>7.2f}x {batched / baseline:>8.2f}x"
            )
    print(f"\nfaceswap, pairs/s ({args.swap_pairs} pairs, 128 px):")
    print(f"{'threads':>8} {'per-sample':>11} {'batched':>9} {'ratio':>7}")
    for threads in args.threads:
        reference, batched = bench_faceswap(args.swap_pairs, threads, args.repeats)
        print(f"{threads:>8} {reference:>11.1f} {batched:>9.1f} {batched / reference:>6.1f}x")


if __name__ == "__main__":
    main()
