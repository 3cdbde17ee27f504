"""Real face ingestion: videos / VoxCeleb-style frame folders -> aligned face clips; photos -> aligned face images.

    python -m data_shards ingest --videos PATH --out URL [--fps 4.1667] [--size 128] [--margin 0.35] ...
    python -m data_shards ingest --images DIR --out URL [--size 128] [--identity-from folder|image] ...

``--videos``: PATH holds video files and/or frame folders laid out as `<identity>/<video>/<utterance>/*.jpg`.
Frames are subsampled to `--fps` by timestamp; each kept frame goes through `faces.FaceAligner`. A frame without a
face (or an unreadable one) ends the current clip; clips shorter than `--min-clip-frames` are dropped. Written as
``clips`` shards.

``--images``: every image file under DIR (.jpg/.jpeg/.png, any case, any depth; sorted) goes through the same
`faces.FaceAligner` (largest face) and is written as one sample of a ``frames`` shard dataset: the aligned crop,
its 68 landmarks in crop pixels, ``size``, and ``identity_id`` = the name of the image's parent folder (lay photos
out as `<identity>/*.jpg`; ``--identity-from image`` makes every image its own identity, for layouts whose folders
are not people, e.g. expression classes). Pretraining reads such a dataset as one-frame clips (SimCLR, FaceSwap,
MaskFN; docs/data.md "Image datasets").

Bad input (no face, unreadable file, undecodable video) is reported per file, counted by reason in the manifest's
``skipped`` and never stops the run; the manifest is written last, when every shard is in place.

``python -m data_shards ingest ... --ray [ADDRESS]`` runs the same `Ingestor` as Ray tasks, one per shard-sized
unit of the inputs, resumable after a crash (`data_shards.ray_ingest`).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from common.errors import ConfigError
from data_shards.faces import FaceAligner, FaceConfig, FaceModelError

log = logging.getLogger("data_shards.ingest")

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
FRAME_EXTS = {".jpg", ".jpeg", ".png"}
IMAGE_EXTS = FRAME_EXTS  # --images: photo files, compared lower-cased (.JPG, .Png are images too)
IDENTITY_FROM = ("folder", "image")
SKIPPED_LISTED = 50  # --images: files named in the closing summary (every one is named in the log)
NO_DECODER_HELP = "no video decoder installed: pip install av (PyAV) or opencv-python-headless"


@dataclass
class IngestConfig:
    videos: str = ""  # input folder (or one video file); or, instead:
    images: str = ""  # folder of face photos (or one photo) -> a ``frames`` dataset
    identity_from: str = "folder"  # --images: identity_id = parent folder's name, or each "image" its own
    out: str = ""  # dataset URL: local folder or s3://bucket/prefix
    split: str = "pretrain"
    fps: float = 25.0 / 6.0  # target rate of the stored clips (the paper's 25/6 fps)
    frames_fps: float = 25.0  # source rate of frame folders (VoxCeleb frames are 25 fps)
    min_clip_frames: int = 4
    max_clip_frames: int = 64  # long face tracks are cut into clips of at most this many frames
    max_seconds: float = 0.0  # read at most this much of each source (0: all)
    shard_samples: int = 256
    shard_bytes: int = 512 * 1024 * 1024
    jpeg_quality: int = 90
    face: FaceConfig = field(default_factory=FaceConfig)

    def validate(self) -> None:

        if bool(self.videos) == bool(self.images):
            raise ConfigError(
                "config keys 'videos' and 'images': give exactly one (--videos: a folder of videos / frame "
                "folders -> clip shards; --images: a folder of face photos -> frames shards)"
            )
        if self.identity_from not in IDENTITY_FROM:
            raise ConfigError(
                f"config key 'identity_from': one of {list(IDENTITY_FROM)}, got {self.identity_from!r}"
            )
        if not self.out:
            raise ConfigError("config key 'out': required (a local folder or s3://bucket/prefix)")
        for key in ("fps", "frames_fps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key '{key}': must be > 0, got {getattr(self, key)}")
        if self.min_clip_frames < 1:
            raise ConfigError(f"config key 'min_clip_frames': must be >= 1, got {self.min_clip_frames}")
        if self.max_clip_frames < self.min_clip_frames:
            raise ConfigError(
                f"config key 'max_clip_frames': must be >= min_clip_frames ({self.min_clip_frames}), "
                f"got {self.max_clip_frames}"
            )
        if self.shard_samples < 1:
            raise ConfigError(f"config key 'shard_samples': must be >= 1, got {self.shard_samples}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"config key 'jpeg_quality': must be in [1, 100], got {self.jpeg_quality}")
        self.face.validate()


class ClipSink(Protocol):
    """What ingestion needs from `data_shards.write.ShardWriter` (tests may pass an in-memory one)."""

    def write(self, key: str, jpegs: list[bytes], meta: dict) -> Any: ...

    def skip(self, reason: str, detail: str = "") -> Any: ...


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    kind: str  # "video" | "frames"
    path: Path
    identity_id: str
    name: str  # path relative to the input root, used for messages and clip ids


def _identity(root: Path, path: Path, loose_name: str) -> str:
    rel = path.relative_to(root).parts
    # `<identity>/...` under the root; a loose video (or the root frame folder itself) names its own identity.
    return rel[0] if len(rel) >= 2 else loose_name


def discover_sources(root: Path) -> list[Source]:
    """Videos and frame folders under `root`, in a stable (sorted) order."""
    if root.is_file():
        return [Source("video", root, root.stem, root.name)]
    sources: list[Source] = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if any(p.suffix.lower() in FRAME_EXTS for p in files):
            rel = folder.relative_to(root).as_posix() if folder != root else root.name
            sources.append(Source("frames", folder, _identity(root, folder / "x", folder.name), rel))
        for video in (p for p in files if p.suffix.lower() in VIDEO_EXTS):
            rel = video.relative_to(root).as_posix()
            sources.append(Source("video", video, _identity(root, video, video.stem), rel))
    return sources


# ----------------------------------------------------------------------------------------------- frames


@dataclass
class RawFrame:
    number: int  # frame number in the source (video frame index, or the number in the file name)
    time: float  # seconds from the start of the source
    load: Callable[[], np.ndarray]  # decodes the RGB image only when the frame is kept
    name: str = ""  # file name (frame folders) for messages


def frame_sort_key(path: Path) -> tuple:
    """Numeric order by the digit groups of the name (1, 2, 10), never by listing order."""
    return (tuple(int(d) for d in re.findall(r"\d+", path.stem)), path.name)


def list_frames(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTS), key=frame_sort_key)


class CorruptFrame(ValueError):
    pass


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()  # truncated or garbage data fails here, not later
            return np.ascontiguousarray(np.asarray(img.convert("RGB")))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptFrame(f"{path}: unreadable image ({err})") from err


def discover_images(root: Path) -> list[Path]:
    """Image files (:data:`IMAGE_EXTS`, any case) under `root` at any depth, sorted by path; `root` itself if a file."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def load_photo(path: Path) -> np.ndarray:
    """A photo as RGB uint8, turned upright by its EXIF orientation (phones store portraits sideways)."""
    from PIL import ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            return np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(img).convert("RGB")))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptFrame(f"{path}: unreadable image ({err})") from err


def iter_folder_frames(folder: Path, frames_fps: float) -> Iterator[RawFrame]:
    paths = list_frames(folder)
    numbers = [int(re.findall(r"\d+", p.stem)[-1]) if re.search(r"\d", p.stem) else -1 for p in paths]
    # Time from the number in the name when it increases strictly (missing files then leave a real gap).
    if not all(b > a for a, b in zip(numbers, numbers[1:])) or (numbers and numbers[0] < 0):
        numbers = list(range(len(paths)))
    start = numbers[0] if numbers else 0
    for path, number in zip(paths, numbers):
        yield RawFrame(number, (number - start) / frames_fps, lambda p=path: load_image(p), path.name)


class VideoOpenError(OSError):
    pass


class NoVideoDecoder(VideoOpenError):
    pass


def video_backend() -> str | None:
    """The first importable decoder: PyAV, then OpenCV. (torchvision >= 0.22 no longer decodes video.)"""
    import importlib.util

    for module, name in (("av", "av"), ("cv2", "cv2")):
        if importlib.util.find_spec(module) is not None:
            return name
    return None


def _iter_av(path: Path) -> Iterator[RawFrame]:
    import av

    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except Exception as err:  # PyAV raises its own error classes for missing/corrupt files
        raise VideoOpenError(f"{path}: cannot open video ({err})") from err
    with container:
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25.0)
        for i, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else i / rate
            yield RawFrame(i, t, lambda f=frame: f.to_ndarray(format="rgb24"))


def _iter_cv2(path: Path) -> Iterator[RawFrame]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoOpenError(f"{path}: cannot open video")
    try:
        rate = cap.get(cv2.CAP_PROP_FPS) or 25.0
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            rgb = np.ascontiguousarray(bgr[:, :, ::-1])
            yield RawFrame(i, i / rate, lambda a=rgb: a)
            i += 1
    finally:
        cap.release()


class VideoDecodeError(RuntimeError):
    pass


def iter_video_frames(path: Path) -> Iterator[RawFrame]:
    backend = video_backend()
    if backend is None:
        raise NoVideoDecoder(f"{path}: {NO_DECODER_HELP}")
    frames = _iter_av(path) if backend == "av" else _iter_cv2(path)
    decoded = 0
    while True:
        # Decoder errors mid-stream become VideoDecodeError, so face/alignment bugs are never masked as them.
        try:
            frame = next(frames)
        except StopIteration:
            return
        except VideoOpenError:
            raise
        except Exception as err:
            raise VideoDecodeError(f"{path}: decoding failed after {decoded} frames: {err}") from err
        decoded += 1
        yield frame


def subsample(frames: Iterable[RawFrame], fps: float, max_seconds: float = 0.0) -> Iterator[RawFrame]:
    """The first frame of each 1/fps time slot (timestamps, not frame counts: robust to any source rate)."""
    start: float | None = None
    last_slot = -1
    for frame in frames:
        if start is None:
            start = frame.time
        elapsed = frame.time - start
        if max_seconds and elapsed >= max_seconds:
            return
        slot = math.floor(elapsed * fps + 1e-6)
        if slot > last_slot:
            last_slot = slot
            yield frame


# ------------------------------------------------------------------------------------------------ clips


def slug(text: str) -> str:
    """Key-safe: WebDataset splits keys at the first dot, so only [A-Za-z0-9_-] survive."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def source_stem(src: Source) -> str:
    """The key stem of a source's clips (``<stem>-c000``, ...)."""
    return slug(Path(src.name).with_suffix("").as_posix() if src.kind == "video" else src.name)


def image_stem(name: str) -> str:
    """The sample key of a photo (its path under the input root, without suffix)."""
    return slug(Path(name).with_suffix("").as_posix())


@dataclass
class _Clip:
    jpegs: list[bytes] = field(default_factory=list)
    landmarks: list[list[list[float]]] = field(default_factory=list)
    source_frames: list[int] = field(default_factory=list)
    start_time: float = 0.0


class Ingestor:
    """Turns sources into clips on a sink; `stats` counts everything by reason."""

    def __init__(
        self,
        cfg: IngestConfig,
        sink: ClipSink,
        aligner: FaceAligner | None = None,
        stems: dict[str, str] | None = None,
    ):
        self.cfg = cfg
        self.sink = sink
        self.aligner = aligner or FaceAligner(cfg.face)
        self.stats: Counter[str] = Counter()
        self.identities: set[str] = set()
        self._keys: set[str] = set()
        # (input, reason) of every image left out and every video that could not be read to its end
        self.failed: list[tuple[str, str]] = []
        # Key stem per source name, assigned by a distributed plan so keys stay unique across its tasks.
        self.stems = stems or {}

    def _skip(self, reason: str, detail: str) -> None:
        self.stats[f"skipped.{reason}"] += 1
        self.sink.skip(reason, detail)

    def _unique_key(self, base: str) -> str:
        key, n = base, 2
        while key in self._keys:
            key, n = f"{base}-{n}", n + 1
        self._keys.add(key)
        return key

    def _flush(self, src: Source, clip: _Clip, index: int) -> int:
        """Write `clip` if long enough; returns the next clip index."""
        if not clip.jpegs:
            return index
        if len(clip.jpegs) < self.cfg.min_clip_frames:
            self._skip("short_clip", f"{src.name}: {len(clip.jpegs)} frames < {self.cfg.min_clip_frames}")
            return index
        key = self._unique_key(f"{self.stems.get(src.name) or source_stem(src)}-c{index:03d}")
        meta = {
            "clip_id": key,
            "identity_id": src.identity_id,
            "fps": self.cfg.fps,
            "size": self.cfg.face.size,
            "source": "video",
            "frame_indices": list(range(len(clip.jpegs))),
            "landmarks": clip.landmarks,
            "labels": None,
            "source_path": src.name,
            "source_frames": clip.source_frames,
            "start_time": round(clip.start_time, 4),
        }
        self.sink.write(key, clip.jpegs, meta)
        self.stats["clips"] += 1
        self.stats["clip_frames"] += len(clip.jpegs)
        self.identities.add(src.identity_id)
        return index + 1

    def _encode(self, crop: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=self.cfg.jpeg_quality)
        return buf.getvalue()

    def ingest_source(self, src: Source) -> None:
        self.stats["sources"] += 1
        clip, index, sampled, no_face, corrupt = _Clip(), 0, 0, 0, 0
        try:
            frames = (
                iter_folder_frames(src.path, self.cfg.frames_fps)
                if src.kind == "frames"
                else iter_video_frames(src.path)
            )
            for frame in subsample(frames, self.cfg.fps, self.cfg.max_seconds):
                sampled += 1
                try:
                    face = self.aligner.process(frame.load())
                except CorruptFrame as err:
                    log.warning("corrupt frame skipped: %s", err)
                    self._skip("corrupt_frame", str(err))
                    corrupt += 1
                    face = None
                else:
                    if face is None:
                        no_face += 1
                        self._skip("no_face", f"{src.name}: frame {frame.number}")
                if face is None:  # a gap ends the clip: clips stay temporally contiguous
                    index = self._flush(src, clip, index)
                    clip = _Clip()
                    continue
                if not clip.jpegs:
                    clip.start_time = frame.time
                clip.jpegs.append(self._encode(face.crop))
                clip.landmarks.append(
                    np.round(face.landmarks.astype(np.float64), 2).tolist()
                )  # float64: short JSON
                clip.source_frames.append(frame.number)
                if len(clip.jpegs) >= self.cfg.max_clip_frames:
                    index = self._flush(src, clip, index)
                    clip = _Clip()
        except VideoOpenError as err:
            reason = "no_video_decoder" if isinstance(err, NoVideoDecoder) else "unreadable_video"
            log.warning("video skipped: %s", err)
            self._skip(reason, str(err))
            self.failed.append((src.name, reason))
            return
        except VideoDecodeError as err:  # keep the clips decoded so far
            log.warning("video decoding stopped early: %s", err)
            self._skip("video_decode_error", str(err))
            self.failed.append((src.name, "video_decode_error"))
        finally:
            self.stats["frames_sampled"] += sampled
        self._flush(src, clip, index)
        self.stats["faces"] += sampled - no_face - corrupt
        if no_face:
            log.info("%s: %d of %d sampled frames had no face", src.name, no_face, sampled)

    def run(self, sources: Iterable[Source]) -> Counter[str]:
        for src in sources:
            self.ingest_source(src)
        return self.stats

    # -------------------------------------------------------------------------------------------- images

    def _image_failed(self, name: str, reason: str, detail: str) -> None:
        log.warning("image skipped (%s): %s", reason, detail)
        self.failed.append((name, reason))
        self._skip(reason, detail)

    def ingest_image(self, root: Path, path: Path, key: str | None = None) -> None:
        """One photo -> one ``frames`` sample (the aligned crop of its largest face), or a counted skip.
        ``key``: the sample key a distributed plan assigned (default: from the file's path)."""
        name = path.relative_to(root).as_posix() if path != root else path.name
        self.stats["images"] += 1
        try:
            rgb = load_photo(path)
        except CorruptFrame as err:
            self._image_failed(name, "unreadable_image", str(err))
            return
        face = self.aligner.process(rgb)
        if face is None:
            self._image_failed(name, "no_face", f"{name}: no face found")
            return
        key = self._unique_key(key or image_stem(name))
        identity = path.parent.name if self.cfg.identity_from == "folder" else key
        from data_shards.readers import frame_meta

        meta = frame_meta(
            "images",
            None,
            identity_id=identity,
            landmarks=np.round(face.landmarks.astype(np.float64), 2).tolist(),  # crop pixels
        )
        meta.update(size=self.cfg.face.size, source_path=name, num_faces=face.num_faces)
        self.sink.write(key, self._encode(face.crop), meta)
        self.stats["faces"] += 1
        self.identities.add(identity)

    def run_images(self, root: Path, paths: Iterable[Path]) -> Counter[str]:
        for path in paths:
            self.ingest_image(root, path)
        return self.stats


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d, f = IngestConfig(), FaceConfig()
    p = argparse.ArgumentParser(
        prog="python -m data_shards ingest",
        description="Videos / VoxCeleb frame folders -> eye-aligned face crops + 68 landmarks -> clip shards.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--videos", help="folder of videos and/or <identity>/<video>/<utt>/*.jpg -> clips shards"
    )
    source.add_argument(
        "--images",
        help="folder of face photos (*.jpg/*.jpeg/*.png, any depth), <identity>/*.jpg -> frames shards",
    )
    p.add_argument(
        "--identity-from",
        choices=IDENTITY_FROM,
        default=d.identity_from,
        help="--images: identity_id from the parent folder's name, or each image its own identity",
    )
    p.add_argument("--out", required=True, help="dataset URL: local folder or s3://bucket/prefix")
    p.add_argument("--split", default=d.split)
    p.add_argument("--fps", type=float, default=d.fps, help="target clip rate (default 25/6)")
    p.add_argument("--frames-fps", type=float, default=d.frames_fps, help="source rate of frame folders")
    p.add_argument("--size", type=int, default=f.size, help="crop side in pixels")
    p.add_argument("--margin", type=float, default=f.margin, help="context around the face, per side")
    p.add_argument("--upsample", type=int, default=f.upsample, help="HOG upsampling (1 for small faces)")
    p.add_argument("--min-clip-frames", type=int, default=d.min_clip_frames)
    p.add_argument("--max-clip-frames", type=int, default=d.max_clip_frames)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="per source; 0 reads all")
    p.add_argument("--shard-samples", type=int, default=d.shard_samples, help="clips (images) per shard")
    p.add_argument("--shard-mb", type=float, default=d.shard_bytes / 2**20, help="shard size limit")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    return p


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    face = FaceConfig(size=args.size, margin=args.margin, upsample=args.upsample)
    return IngestConfig(
        videos=args.videos or "",
        images=args.images or "",
        identity_from=args.identity_from,
        out=args.out,
        split=args.split,
        fps=args.fps,
        frames_fps=args.frames_fps,
        min_clip_frames=args.min_clip_frames,
        max_clip_frames=args.max_clip_frames,
        max_seconds=args.max_seconds,
        shard_samples=args.shard_samples,
        shard_bytes=int(args.shard_mb * 2**20),
        jpeg_quality=args.jpeg_quality,
        face=face,
    )


def format_summary(stats: Counter[str], identities: int, seconds: float) -> str:
    lines = [
        f"ingest: {stats['clips']} clips ({stats['clip_frames']} frames, {identities} identities) from "
        f"{stats['sources']} sources; {stats['frames_sampled']} frames sampled, {stats['faces']} with a face; "
        f"{seconds:.1f} s"
    ]
    skipped = {k.split(".", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("skipped.")}
    lines.append("skipped: " + (", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"))
    return "\n".join(lines)


def format_image_summary(ingestor: Ingestor, seconds: float) -> str:
    stats = ingestor.stats
    lines = [
        f"ingest: {stats['faces']} face images ({len(ingestor.identities)} identities) from {stats['images']} "
        f"image files; {seconds:.1f} s"
    ]
    skipped = {k.split(".", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("skipped.")}
    lines.append("skipped: " + (", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"))
    for name, reason in ingestor.failed[:SKIPPED_LISTED]:
        lines.append(f"  not ingested ({reason}): {name}")
    if len(ingestor.failed) > SKIPPED_LISTED:
        lines.append(
            f"  ... and {len(ingestor.failed) - SKIPPED_LISTED} more (each is named in the log above)"
        )
    return "\n".join(lines)


def ingest(cfg: IngestConfig, sink: ClipSink, aligner: FaceAligner | None = None) -> Ingestor:
    """Library entry: ingest everything under cfg.videos (clips) or cfg.images (one sample per photo) into
    `sink`; returns the Ingestor (stats, and for images the files left out)."""
    ingestor = Ingestor(cfg, sink, aligner)
    if cfg.images:
        root = Path(cfg.images)
        ingestor.run_images(root, discover_images(root))
    else:
        ingestor.run(discover_sources(Path(cfg.videos)))
    return ingestor


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ingest"]:  # tolerate being handed the sub-command too
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.images:
        return _main_images(cfg)
    root = Path(cfg.videos)
    if not root.exists():
        print(
            f"error: --videos {root} does not exist: pass a folder of videos or frame folders",
            file=sys.stderr,
        )
        return 2
    sources = discover_sources(root)
    if not sources:
        print(
            f"error: no videos ({', '.join(sorted(VIDEO_EXTS))}) or frame folders (*.jpg/*.png) under {root}",
            file=sys.stderr,
        )
        return 2
    if any(s.kind == "video" for s in sources) and video_backend() is None:
        print(f"warning: {NO_DECODER_HELP}; video files will be skipped", file=sys.stderr)

    def run(ingestor: Ingestor, writer) -> None:
        ingestor.run(sources)

    def report(ingestor: Ingestor, seconds: float) -> int:
        print(format_summary(ingestor.stats, len(ingestor.identities), seconds), file=sys.stderr)
        if not ingestor.stats["clips"]:
            print("error: no clip was written (see the skipped counts above)", file=sys.stderr)
            return 1
        return 0

    return _ingest_into_shards(cfg, "clips", generator_of(cfg), run, report)


def generator_of(cfg: IngestConfig) -> dict:
    """The manifest's ``generator`` record of an ingest: its settings (for --images, the video-only ones left out)."""
    if not cfg.images:
        return {"name": "ingest", **asdict(cfg)}
    video_only = ("videos", "fps", "frames_fps", "min_clip_frames", "max_clip_frames", "max_seconds")
    generator = {"name": "ingest", "input": "images"}
    generator.update((k, v) for k, v in asdict(cfg).items() if k not in video_only)
    return generator


def _main_images(cfg: IngestConfig) -> int:
    """``--images``: photos -> ``frames`` shards (one aligned face per photo); the manifest is written last."""
    root = Path(cfg.images)
    if not root.exists():
        print(f"error: --images {root} does not exist: pass a folder of face photos", file=sys.stderr)
        return 2
    paths = discover_images(root)
    if not paths:
        exts = ", ".join(f"*{e}" for e in sorted(IMAGE_EXTS))
        print(f"error: no images ({exts}, any case) under {root}", file=sys.stderr)
        return 2

    generator = generator_of(cfg)

    def run(ingestor: Ingestor, writer) -> None:
        ingestor.run_images(root, paths)
        if not ingestor.stats["faces"]:
            writer.abort()  # no dataset without a single image: nothing is committed

    def report(ingestor: Ingestor, seconds: float) -> int:
        print(format_image_summary(ingestor, seconds), file=sys.stderr)
        if not ingestor.stats["faces"]:
            print("error: no face image was written (see the skipped images above)", file=sys.stderr)
            return 1
        return 0

    return _ingest_into_shards(cfg, "frames", generator, run, report)


def _ingest_into_shards(cfg: IngestConfig, kind: str, generator: dict, run, report) -> int:
    """Check the destination and the face model, run ``run(ingestor, writer)`` into a ShardWriter of ``kind``
    (its manifest is written last), then ``report(ingestor, seconds)`` gives the exit code; store errors are one
    line and exit 2."""
    from data_shards import store
    from data_shards.write import ShardWriter

    try:
        store.check_access(cfg.out, write=True)
        aligner = FaceAligner(cfg.face)
    except (store.StoreError, FaceModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        with ShardWriter(
            cfg.out,
            kind=kind,
            split=cfg.split,
            generator=generator,
            max_samples=cfg.shard_samples,
            max_bytes=cfg.shard_bytes,
        ) as writer:
            writer.skips.log_first = (
                0  # the ingestor names each bad file itself; the writer does not repeat it
            )
            ingestor = Ingestor(cfg, writer, aligner)
            run(ingestor, writer)
    except store.StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return report(ingestor, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
