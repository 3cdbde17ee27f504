"""Dataset integrity: shard sha256 checked while streaming, and concurrent writers never publish a mixed dataset."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_shards import read as shard_read
from data_shards import store
from data_shards import write as shard_write
from data_shards.read import ShardIntegrityError, SkipCounter, iter_samples, read_manifest, shard_urls
from data_shards.verify import verify
from data_shards.write import ConcurrentWriteError, ShardWriter, encode_jpeg
from pretrain.config import DataConfig
from pretrain.dataset import open_dataset
from pretrain.pipelines.clips import resilient_reader
from pretrain.stream import ClipStream, StreamConfig

SIZE = 32


def write_dataset(url: str, clips: int = 8, per_shard: int = 2, tag: str = "c", seed: int = 0) -> dict:
    """A clips dataset of ``clips`` two-frame clips with real JPEGs, ``per_shard`` clips per shard."""
    rng = np.random.default_rng(seed)
    with ShardWriter(url, "clips", "pretrain", {"seed": seed}, max_samples=per_shard) as writer:
        for i in range(clips):
            jpegs = [encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
            meta = {"identity_id": f"{tag}{i // 2}", "frame_indices": [0, 1], "fps": 25 / 6, "size": SIZE}
            meta["landmarks"] = rng.uniform(0, SIZE, (2, 68, 2)).tolist()
            writer.write(f"{tag}{i:04d}", jpegs, meta)
    return writer.manifest


def flip_jpeg_byte(path: Path) -> None:
    """Flip one byte in the middle of the first JPEG payload: the tar (headers, sizes) stays valid."""
    data = bytearray(path.read_bytes())
    start = data.find(b"\xff\xd8")
    end = data.find(b"\xff\xd9", start)
    assert 0 < start < end
    data[(start + end) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def local_shard(url: str, manifest: dict, index: int) -> Path:
    return Path(url) / manifest["shards"][index]["name"]


@pytest.fixture
def flipped(tmp_path):
    """A 4-shard dataset whose shard 1 has one JPEG byte flipped; (url, manifest)."""
    url = str(tmp_path / "ds")
    manifest = write_dataset(url)
    flip_jpeg_byte(local_shard(url, manifest, 1))
    return url, manifest


# ---------------------------------------------------------------- the reader's streaming check


def test_flipped_jpeg_byte_is_a_counted_sha256_mismatch_and_no_sample_of_a_small_shard_is_used(flipped):
    url, manifest = flipped
    entry = manifest["shards"][1]
    bad_url = shard_urls(url)[1]
    skips = SkipCounter()
    got = []
    with pytest.raises(ShardIntegrityError) as caught:
        for sample in iter_samples(bad_url, skips, sha256=entry["sha256"]):
            got.append(sample)
    assert got == []  # a small shard is checked before its first sample
    assert caught.value.samples_yielded == 0 and caught.value.url == bad_url
    assert skips.as_dict() == {"sha256_mismatch": 1}
    # The good shards pass with nothing counted, and yield exactly what an unchecked read yields.
    for entry, shard in zip(manifest["shards"], shard_urls(url)):
        if shard == bad_url:
            continue
        checked = [s["key"] for s in iter_samples(shard, skips, sha256=entry["sha256"])]
        assert checked == [s["key"] for s in iter_samples(shard, skips)]
    assert skips.as_dict() == {"sha256_mismatch": 1}


def test_without_a_sha256_the_flipped_shard_reads_as_before(flipped):
    url, _ = flipped
    skips = SkipCounter()
    assert len(list(iter_samples(shard_urls(url)[1], skips))) == 2
    assert skips.as_dict() == {}


def test_one_clear_warning_names_the_shard_and_the_fix(flipped, caplog):
    url, manifest = flipped
    with caplog.at_level("WARNING"), pytest.raises(ShardIntegrityError):
        list(iter_samples(shard_urls(url)[1], SkipCounter(), sha256=manifest["shards"][1]["sha256"]))
    lines = [r.getMessage() for r in caplog.records if "sha256_mismatch" in r.getMessage()]
    assert len(lines) == 1
    assert manifest["shards"][1]["name"] in lines[0]
    assert "re-write the dataset" in lines[0] and f"python -m data_shards verify {url}" in lines[0]


def test_a_big_shard_streams_and_is_found_out_at_its_end(flipped, monkeypatch):
    url, manifest = flipped
    monkeypatch.setattr(shard_read, "VERIFY_BUFFER_BYTES", 0)  # every shard is "big": streamed
    skips = SkipCounter()
    got = []
    with pytest.raises(ShardIntegrityError) as caught:
        for sample in iter_samples(shard_urls(url)[1], skips, sha256=manifest["shards"][1]["sha256"]):
            got.append(sample["key"])
    assert len(got) == 2 and caught.value.samples_yielded == 2
    assert skips.as_dict() == {"sha256_mismatch": 1}
    good = shard_urls(url)[0]
    assert len(list(iter_samples(good, skips, sha256=manifest["shards"][0]["sha256"]))) == 2
    assert skips.as_dict() == {"sha256_mismatch": 1}


def test_a_store_retry_mid_shard_rehashes_from_the_first_byte(tmp_path):
    url = str(tmp_path / "ds")
    manifest = write_dataset(url, clips=4, per_shard=4)
    calls = []

    def flaky(shard_url, handler, sha256=None):
        calls.append(sha256)
        for i, sample in enumerate(iter_samples(shard_url, handler, sha256=sha256)):
            if len(calls) == 1 and i == 2:
                raise ConnectionResetError("store went away")
            yield sample

    skips = SkipCounter()
    read = resilient_reader(flaky, skips, sleep=lambda s: None)
    keys = [s["key"] for s in read(shard_urls(url)[0], sha256=manifest["shards"][0]["sha256"])]
    assert keys == [f"c{i:04d}" for i in range(4)] and len(calls) == 2
    assert skips.as_dict() == {}


# ---------------------------------------------------------------- the training stream


def stream_of(url: str, cfg, skips: SkipCounter, **kw) -> ClipStream:
    dataset = open_dataset(url)
    return ClipStream.from_dataset(dataset, cfg, read_shard=resilient_reader(iter_samples, skips), **kw)


def test_the_stream_replaces_a_mismatching_shard_like_an_unreadable_one(flipped):
    url, manifest = flipped
    bad_keys = {"c0002", "c0003"}  # shard 1
    skips = SkipCounter()
    stream = stream_of(url, DataConfig(url=url, shuffle_buffer=2), skips)
    first = [s["key"] for s in stream]
    assert len(first) == 8  # the lane keeps its length: the bad shard's slots come from the next shards
    assert not bad_keys & set(first)
    assert skips.as_dict() == {"sha256_mismatch": 1}
    assert stream.counters["unreadable_shard"] == 1
    assert stream.bad_shards == {shard_urls(url)[1]}
    second = [s["key"] for s in stream]  # next epoch: the shard is not read (or warned about) again
    assert len(second) == 8 and not bad_keys & set(second)
    assert skips.as_dict() == {"sha256_mismatch": 1} and stream.counters["unreadable_shard"] == 2


def test_the_stream_counts_nothing_with_verify_sha256_off(flipped):
    url, _ = flipped
    skips = SkipCounter()
    stream = stream_of(url, DataConfig(url=url, shuffle_buffer=2, verify_sha256=False), skips)
    keys = [s["key"] for s in stream]
    assert sorted(keys) == [f"c{i:04d}" for i in range(8)]
    assert skips.as_dict() == {} and not stream.counters and not stream.bad_shards


def test_the_stream_on_a_big_shard_keeps_what_it_streamed_then_drops_the_shard(flipped, monkeypatch):
    url, _ = flipped
    monkeypatch.setattr(shard_read, "VERIFY_BUFFER_BYTES", 0)
    skips = SkipCounter()
    stream = stream_of(url, StreamConfig(url=url, shuffle_buffer=2), skips)
    first = [s["key"] for s in stream]
    assert sorted(first) == [f"c{i:04d}" for i in range(8)]  # found out only at the shard's end
    assert skips.as_dict() == {"sha256_mismatch": 1} and stream.bad_shards == {shard_urls(url)[1]}
    second = [s["key"] for s in stream]
    assert len(second) == 8 and not {"c0002", "c0003"} & set(second)
    assert stream.counters["unreadable_shard"] == 1


def test_the_stream_checks_the_last_shard_of_a_lane_too(tmp_path, monkeypatch):
    """A streamed shard is checked after its last sample; the lane's last shard as soon as its last input is read."""
    monkeypatch.setattr(shard_read, "VERIFY_BUFFER_BYTES", 0)
    url = str(tmp_path / "ds")
    manifest = write_dataset(url, clips=6, per_shard=2)
    skips = SkipCounter()
    stream = stream_of(url, DataConfig(url=url, shuffle_buffer=4), skips)
    last = stream._lane_shards(0, 0, 0)[-1]  # the shard epoch 0 reads last
    flip_jpeg_byte(local_shard(url, manifest, last))
    assert len(list(stream)) == 6  # epoch 0: the flipped shard is read last, its samples already used
    assert skips.as_dict() == {"sha256_mismatch": 1} and stream.bad_shards == {shard_urls(url)[last]}


def test_a_lane_whose_shards_all_mismatch_is_a_clear_error(tmp_path):
    url = str(tmp_path / "ds")
    manifest = write_dataset(url, clips=4, per_shard=2)
    for i in range(2):
        flip_jpeg_byte(local_shard(url, manifest, i))
    skips = SkipCounter()
    with pytest.raises(Exception, match="passed its sha256 check"):
        list(stream_of(url, DataConfig(url=url, shuffle_buffer=1), skips))
    assert skips.as_dict() == {"sha256_mismatch": 2}


def test_a_good_dataset_streams_the_same_with_and_without_the_check(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url, clips=10, per_shard=3)
    skips = SkipCounter()
    on = [s["key"] for s in stream_of(url, DataConfig(url=url, shuffle_buffer=3), skips, world_size=2)]
    off = [
        s["key"]
        for s in stream_of(
            url, DataConfig(url=url, shuffle_buffer=3, verify_sha256=False), skips, world_size=2
        )
    ]
    assert on == off and skips.as_dict() == {}


def test_verify_reports_the_flipped_shard(flipped):
    url, manifest = flipped
    report = verify(url)
    assert report.bad_shards == [manifest["shards"][1]["name"]]
    assert "sha256 does not match the manifest" in report.summary()


# ---------------------------------------------------------------- concurrent writers


def assert_consistent(url: str) -> dict:
    """The committed manifest lists shards that all exist with the listed sha256 and sizes."""
    manifest = read_manifest(url)
    for entry in manifest["shards"]:
        data = store.read_bytes(store.join(url, entry["name"]))
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
        assert len(data) == entry["bytes"]
    report = verify(url)
    assert report.ok, report.summary()
    return manifest


def race(url: str, rounds_tag: str, barrier: bool = True, writers: int = 2, clips: int = 6) -> dict:
    """``writers`` ShardWriters on one URL in threads (all open before any commits when ``barrier``)."""
    results: dict[int, object] = {}
    gate = threading.Barrier(writers) if barrier else None
    rng = np.random.default_rng(7)
    jpeg = encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))

    def run(w: int) -> None:
        try:
            writer = ShardWriter(url, "clips", "pretrain", {"writer": w}, max_samples=2)
            with writer:
                for i in range(clips + w):  # different sample counts: a mix would show
                    writer.write(
                        f"{rounds_tag}w{w}n{i:03d}", [jpeg] * 2, {"frame_indices": [0, 1], "writer": w}
                    )
                if gate is not None:
                    gate.wait(timeout=60)
            results[w] = writer
        except Exception as err:  # noqa: BLE001 - recorded for the assertions
            results[w] = err

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def check_race(url: str, results: dict, must_conflict: bool) -> None:
    winners = [r for r in results.values() if isinstance(r, ShardWriter)]
    losers = [r for r in results.values() if not isinstance(r, ShardWriter)]
    assert winners, losers
    for err in losers:
        assert isinstance(err, ConcurrentWriteError), repr(err)
        assert "concurrent write to" in str(err) and url in str(err)
    if must_conflict:
        assert len(winners) == 1 and len(losers) == len(results) - 1
    manifest = assert_consistent(url)
    assert manifest["write_id"] in {w.write_id for w in winners}
    winner = next(w for w in winners if w.write_id == manifest["write_id"])
    assert [s["name"] for s in manifest["shards"]] == [s.name for s in winner.shards]
    # Every sample is the winner's: nothing of another write is listed.
    keys = [s["key"] for shard in shard_urls(url, manifest) for s in iter_samples(shard)]
    assert len(keys) == manifest["totals"]["samples"] and len({k.split("n")[0] for k in keys}) == 1
    # The losers removed what they published: only the winner's shards are left (plus probes never).
    names = [n for n in store.list_dir(url) if n.startswith("shard-") and n.endswith(".tar")]
    assert sorted(names) == sorted(s["name"] for s in manifest["shards"])
    indexes = [n for n in store.list_dir(url) if n.endswith(".idx")]  # a DALI index beside each, no other
    assert sorted(indexes) == sorted(n[: -len(".tar")] + ".idx" for n in names)


def test_two_writers_on_one_local_folder_never_commit_a_mixed_dataset(tmp_path):
    url = str(tmp_path / "shared")
    check_race(url, race(url, "a"), must_conflict=True)
    # A rewrite race over an existing version: still one consistent winner, the old version's shards gone.
    check_race(url, race(url, "b", writers=3), must_conflict=True)
    for r in range(3):  # no barrier: any interleaving, sequential included
        check_race(url, race(url, f"r{r}", barrier=False), must_conflict=False)


def test_two_writers_on_one_s3_prefix_never_commit_a_mixed_dataset(s3_env):
    url = s3_env.url("test-integrity/shared")
    check_race(url, race(url, "a"), must_conflict=True)
    check_race(url, race(url, "b"), must_conflict=True)
    check_race(url, race(url, "c", barrier=False), must_conflict=False)


def test_a_store_without_conditional_writes_still_never_mixes(s3_env, monkeypatch):
    """Where the store ignores If-Match, both commits land (last one wins), each listing only its own shards."""
    monkeypatch.setattr(shard_write, "_conditional_writes", lambda url: False)
    url = s3_env.url("test-integrity/unconditional")
    results = race(url, "u")
    assert all(isinstance(r, ShardWriter) for r in results.values())
    manifest = assert_consistent(url)
    assert all(s["name"].startswith(f"shard-{manifest['write_id']}-") for s in manifest["shards"])


def test_fresh_prefix_gets_plain_names_and_a_rewrite_gets_its_own(tmp_path):
    url = str(tmp_path / "ds")
    first = write_dataset(url, clips=4, tag="a")
    assert [s["name"] for s in first["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    second = write_dataset(url, clips=6, tag="b")
    wid = second["write_id"]
    assert [s["name"] for s in second["shards"]] == [f"shard-{wid}-{i:06d}.tar" for i in range(3)]
    assert sorted(p.name for p in Path(url).iterdir() if p.suffix != ".idx") == [
        "manifest.json",
        *(s["name"] for s in second["shards"]),
    ]
    third = write_dataset(url, clips=2, tag="c")  # the plain names are free again: the old version is gone
    assert [s["name"] for s in third["shards"]] == ["shard-000000.tar"]
    assert_consistent(url)


def test_the_old_version_stays_readable_until_the_new_one_commits(tmp_path):
    url = str(tmp_path / "ds")
    old = write_dataset(url, clips=4, tag="a")
    rng = np.random.default_rng(1)
    jpeg = encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    with ShardWriter(url, "clips", "pretrain", {}, max_samples=1) as writer:
        for i in range(3):
            writer.write(f"b{i}", [jpeg], {"frame_indices": [0]})  # publishes shards as it goes
        assert read_manifest(url)["write_id"] == old["write_id"]
        assert_consistent(url)
    assert read_manifest(url)["write_id"] == writer.write_id
    assert_consistent(url)


def test_a_failed_write_commits_nothing_and_removes_its_shards(tmp_path):
    url = str(tmp_path / "ds")
    old = write_dataset(url, clips=4, tag="a")
    before = sorted(p.name for p in Path(url).iterdir() if p.suffix != ".idx")
    with pytest.raises(RuntimeError, match="generator died"):
        with ShardWriter(url, "clips", "pretrain", {}, max_samples=1) as writer:
            for i in range(3):
                writer.write(f"b{i}", [b"\xff\xd8x"], {"frame_indices": [0]})
            raise RuntimeError("generator died")
    assert sorted(p.name for p in Path(url).iterdir() if p.suffix != ".idx") == before
    assert read_manifest(url)["write_id"] == old["write_id"]
    assert_consistent(url)


def test_datasets_of_the_old_writer_read_and_are_replaced_cleanly(tmp_path):
    """The old writer: plain names, no write_id, no claim protocol. Reading works; a rewrite replaces it."""
    url = str(tmp_path / "old")
    manifest = write_dataset(url, clips=4, tag="a")
    del manifest["write_id"]
    (Path(url) / "manifest.json").write_text(json.dumps(manifest))
    (Path(url) / "shard-000007.tar").write_bytes(b"stale shard of an even older version")  # unlisted
    assert len([s for u in shard_urls(url) for s in iter_samples(u)]) == 4
    skips = SkipCounter()
    assert len(list(stream_of(url, DataConfig(url=url), skips))) == 4 and skips.as_dict() == {}
    new = write_dataset(url, clips=2, tag="b")
    assert new["shards"][0]["name"].startswith(f"shard-{new['write_id']}-")  # the plain names were taken
    assert_consistent(url)
    left = Counter(p.name.startswith("shard-00000") for p in Path(url).iterdir() if p.suffix != ".idx")
    assert left[True] == 1  # the old version's listed shards are gone; the unlisted stale one is not ours


def test_empty_write_releases_its_claim(tmp_path):
    url = str(tmp_path / "empty")
    with ShardWriter(url, "frames", "eval", {}) as writer:
        pass
    assert writer.manifest["shards"] == []
    assert sorted(p.name for p in Path(url).iterdir() if p.suffix != ".idx") == ["manifest.json"]
