"""Evaluation-set readers on tiny fixtures written in each benchmark's published layout."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import ConfigError
from data_shards.evalsets import EvalsetConfig, build_evalset
from data_shards.read import iter_dataset, read_manifest
from data_shards.readers import LayoutError
from data_shards.verify import verify

SIZE = 24


def save_image(path: Path, side: int = 40, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side + 10, 3), dtype=np.uint8)).save(path, quality=90)


def build(tmp_path, source: str, path: Path, **kw) -> tuple[dict, list[dict]]:
    out = str(tmp_path / f"out-{source}")
    cfg = EvalsetConfig(source=source, out=out, path=str(path), size=SIZE, **kw)
    manifest = build_evalset(cfg)
    assert read_manifest(out) == manifest
    assert verify(out).ok
    samples = list(iter_dataset(out))
    for sample in samples:
        with Image.open(__import__("io").BytesIO(sample["jpeg"])) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    return manifest, samples


def write_affectnet(root: Path) -> None:
    header = [
        "subDirectory_filePath",
        "face_x",
        "face_y",
        "face_width",
        "face_height",
        "facial_landmarks",
        "expression",
        "valence",
        "arousal",
    ]
    marks = ";".join(f"{10 + i % 20}.5;{12 + i % 15}.0" for i in range(68))
    rows = {
        "training.csv": [
            ["689/a1.jpg", 5, 5, 30, 30, marks, 1, 0.5, -0.25],
            ["689/a2.jpg", 0, 0, 40, 40, "", 7, -2, -2],
            ["689/a3.jpg", 0, 0, 40, 40, "", 9, 0, 0],  # Uncertain: skipped
            ["689/a4.jpg", 0, 0, 40, 40, "", 10, 0, 0],  # No-Face: skipped
            ["689/gone.jpg", 0, 0, 40, 40, "", 3, 0, 0],  # image missing: skipped
        ],
        "validation.csv": [["12/b1.jpg", 2, 2, 20, 20, marks, 6, -0.8, 0.9]],
    }
    for name, table in rows.items():
        with open(root / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(table)
    for i, rel in enumerate(["689/a1.jpg", "689/a2.jpg", "689/a3.jpg", "689/a4.jpg", "12/b1.jpg"]):
        save_image(root / "Manually_Annotated_Images" / rel, seed=i)


def test_affectnet_reader(tmp_path):
    root = tmp_path / "affectnet"
    root.mkdir()
    write_affectnet(root)
    manifest, samples = build(tmp_path, "affectnet", root)
    assert manifest["skipped"] == {"affectnet_no_face": 1, "affectnet_uncertain": 1, "missing_image": 1}
    by_key = {s["key"]: s["meta"] for s in samples}
    assert sorted(by_key) == ["affectnet-test-12_b1", "affectnet-train-689_a1", "affectnet-train-689_a2"]
    a1 = by_key["affectnet-train-689_a1"]
    assert (a1["expression"], a1["valence"], a1["arousal"], a1["split"]) == (1, 0.5, -0.25, "train")
    # Landmark (10.5, 12) in a 30 px box at (5, 5) -> (5.5, 7) * 24/30 in the resized crop.
    assert a1["landmarks"][0] == pytest.approx([4.4, 5.6])
    assert np.asarray(a1["landmarks"]).shape == (68, 2)
    a2 = by_key["affectnet-train-689_a2"]
    assert (a2["expression"], a2["valence"], a2["landmarks"]) == (7, None, None)
    assert by_key["affectnet-test-12_b1"]["split"] == "test"


def test_fer2013_reader(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "fer"
    path.mkdir()
    with open(path / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for emotion, usage in [(0, "Training"), (3, "PublicTest"), (6, "PrivateTest"), (5, "Training")]:
            writer.writerow([emotion, " ".join(map(str, rng.integers(0, 256, 48 * 48))), usage])
        writer.writerow([2, "1 2 3", "Training"])  # wrong pixel count: skipped
    manifest, samples = build(tmp_path, "fer2013", path)
    metas = [s["meta"] for s in samples]
    # FER 0 Angry, 3 Happy, 6 Neutral, 5 Surprise -> AffectNet 6, 1, 0, 3.
    assert [m["expression"] for m in metas] == [6, 1, 0, 3]
    assert [m["split"] for m in metas] == ["train", "val", "test", "train"]
    assert manifest["skipped"] == {"fer2013_bad_pixels": 1}


def test_rafdb_reader(tmp_path):
    root = tmp_path / "basic"
    (root / "EmoLabel").mkdir(parents=True)
    lines = [
        "train_00001.jpg 5",
        "train_00002.jpg 4",
        "test_0001.jpg 7",
        "test_0002.jpg 1",
        "train_00003.jpg 2",
    ]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    save_image(root / "Image" / "aligned" / "train_00001_aligned.jpg", seed=1)
    save_image(root / "Image" / "aligned" / "train_00002_aligned.jpg", seed=2)
    save_image(root / "Image" / "aligned" / "test_0001_aligned.jpg", seed=3)
    save_image(root / "Image" / "original" / "test_0002.jpg", seed=4)  # only the original exists
    manifest, samples = build(tmp_path, "rafdb", root)
    got = {s["key"]: (s["meta"]["expression"], s["meta"]["split"]) for s in samples}
    # RAF 5 Sadness, 4 Happiness, 7 Neutral, 1 Surprise -> AffectNet 2, 1, 0, 3.
    assert got == {
        "rafdb-train_00001": (2, "train"),
        "rafdb-train_00002": (1, "train"),
        "rafdb-test_0001": (0, "test"),
        "rafdb-test_0002": (3, "test"),
    }
    assert manifest["skipped"] == {"missing_image": 1}


def test_lfw_reader(tmp_path):
    root = tmp_path / "lfw-parent"
    for person, count in (("Ada_Lovelace", 2), ("Alan_Turing", 3)):
        for i in range(1, count + 1):
            save_image(root / "lfw" / person / f"{person}_{i:04d}.jpg", side=50, seed=i)
    (root / "lfw" / "Alan_Turing" / "Alan_Turing_0004.jpg").write_bytes(b"not a jpeg")
    manifest, samples = build(tmp_path, "lfw", root, shard_samples=2)
    assert manifest["totals"]["identities"] == 2 and manifest["totals"]["shards"] == 3
    assert [s["meta"]["identity_id"] for s in samples] == ["Ada_Lovelace"] * 2 + ["Alan_Turing"] * 3
    assert all(s["meta"]["expression"] == -1 and s["meta"]["split"] is None for s in samples)
    assert manifest["skipped"] == {"unreadable_image": 1}


def test_limit_stops_early(tmp_path):
    root = tmp_path / "lfw"
    for i in range(1, 5):
        save_image(root / "P_Q" / f"P_Q_{i:04d}.jpg", seed=i)
    manifest, _ = build(tmp_path, "lfw", root, limit=2)
    assert manifest["totals"]["samples"] == 2


@pytest.mark.parametrize("source", ["affectnet", "fer2013", "rafdb", "lfw"])
def test_missing_path_names_the_expected_layout(tmp_path, source):
    cfg = EvalsetConfig(source=source, out=str(tmp_path / "o"), path=str(tmp_path / "nowhere"), size=SIZE)
    with pytest.raises(LayoutError, match="layout"):
        build_evalset(cfg)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_malformed_csv_names_the_file(tmp_path):
    (tmp_path / "fer2013.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LayoutError, match=r"fer2013\.csv lacks columns \['Usage', 'emotion', 'pixels'\]"):
        build_evalset(EvalsetConfig(source="fer2013", out=str(tmp_path / "o"), path=str(tmp_path)))


def test_real_source_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match="needs --path"):
        EvalsetConfig(source="rafdb", out=str(tmp_path)).validate()


def test_cli_reports_a_bad_layout_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "data_shards", "evalset", "--source", "lfw", "--out", str(tmp_path / "o")]
    result = subprocess.run(
        [*cmd, "--path", str(tmp_path / "none")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: --path") and "Person_Name" in last_line


def test_synth_evalset(tmp_path):
    out = str(tmp_path / "synth")
    cfg = EvalsetConfig(
        source="synth", out=out, identities=2, clips_per_identity=1, seconds=1.0, frames_per_clip=2
    )
    manifest = build_evalset(cfg)
    assert manifest["kind"] == "frames" and manifest["totals"]["samples"] > 0
    assert verify(out).ok
