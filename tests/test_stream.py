"""ClipStream: per-epoch shard shuffle, disjoint equal-length rank split, exact resume (the torchtitan check)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest
import torch

from common.configio import from_dict
from common.errors import ConfigError
from pretrain.dataset import open_dataset
from pretrain.stream import ClipStream, StreamConfig, StreamError, StreamStateError

UNEVEN = [7, 3, 12, 5, 9, 1, 6]  # samples per shard


class FakeShards:
    """In-memory shards: ``url -> [sample, ...]``; counts how often each shard is opened."""

    def __init__(self, counts, short: dict[int, int] | None = None):
        self.urls = [f"mem://shard-{s:06d}.tar" for s in range(len(counts))]
        self.data = {
            u: [{"key": f"s{s}-{i}", "meta": {"n": i}} for i in range(c)]
            for s, (u, c) in enumerate(zip(self.urls, counts))
        }
        for s, actual in (short or {}).items():  # shards holding fewer samples than the manifest says
            self.data[self.urls[s]] = self.data[self.urls[s]][:actual]
        self.counts = list(counts)
        self.opened = Counter()

    def __call__(self, url):
        self.opened[url] += 1
        yield from self.data[url]


def make(shards, **kw):
    kw.setdefault("shuffle_buffer", 4)
    return ClipStream(shards.urls, shards.counts, read_shard=shards, **kw)


def keys(samples):
    return [s["key"] for s in samples]


@pytest.mark.parametrize("equalize", ["drop", "repeat"])
def test_equal_counts_and_disjoint_shards_per_rank(equalize):
    shards = FakeShards(UNEVEN)
    world = 3
    per_rank = [keys(make(shards, rank=r, world_size=world, equalize=equalize)) for r in range(world)]
    lengths = {len(k) for k in per_rank}
    assert len(lengths) == 1
    stream = make(shards, rank=0, world_size=world, equalize=equalize)
    assert lengths == {stream.epoch_length(0)}
    shard_sets = [{k.split("-")[0] for k in ks} for ks in per_rank]
    assert not (shard_sets[0] & shard_sets[1]) and not (shard_sets[1] & shard_sets[2])
    flat = [k for ks in per_rank for k in ks]
    if equalize == "drop":
        assert len(flat) == len(set(flat))  # nothing repeated
    else:
        assert set(flat) == {f"s{s}-{i}" for s, c in enumerate(UNEVEN) for i in range(c)}  # nothing dropped


def test_workers_split_a_rank_and_stay_equal():
    shards = FakeShards(UNEVEN + [4, 8])
    stream = make(shards, rank=1, world_size=2, num_workers=2)
    samples = list(stream)
    per_worker = Counter(s["__worker__"] for s in samples)
    assert per_worker[0] == per_worker[1] == stream.epoch_length(0)
    shards_of = {w: {s["key"].split("-")[0] for s in samples if s["__worker__"] == w} for w in (0, 1)}
    assert not (shards_of[0] & shards_of[1])


def test_epochs_reshuffle_shards_and_are_deterministic():
    shards = FakeShards([5] * 8)
    a = make(shards, rank=0, world_size=2, seed=3)
    e0, e1 = keys(a), keys(a)  # __iter__ moves on to the next epoch
    assert a.epoch == 2
    assert {k.split("-")[0] for k in e0} != {k.split("-")[0] for k in e1}
    b = make(shards, rank=0, world_size=2, seed=3)
    assert keys(b) == e0
    b.set_epoch(1)
    assert keys(b) == e1
    assert keys(make(shards, rank=0, world_size=2, seed=4)) != e0


@pytest.mark.parametrize(
    ("num_workers", "equalize", "buffer", "cut"),
    [(1, "drop", 4, 3), (1, "drop", 4, 9), (1, "repeat", 5, 17), (2, "drop", 3, 7), (1, "drop", 64, 5)],
)
def test_resume_continues_exactly(num_workers, equalize, buffer, cut):
    shards = FakeShards(UNEVEN)
    kw = dict(rank=1, world_size=2, num_workers=num_workers, equalize=equalize, shuffle_buffer=buffer)
    reference = make(shards, **kw)
    full = keys(reference) + keys(reference)  # two epochs, uninterrupted

    first = make(shards, **kw)
    it = iter(first)
    head = keys(islice(it, cut))
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = make(shards, **kw)
    resumed.load_state_dict(state)
    tail = keys(resumed) + keys(resumed)
    assert head + tail == full


def test_resume_rereads_only_buffered_shards():
    shards = FakeShards([20] * 6)
    stream = make(shards, shuffle_buffer=4)
    it = iter(stream)
    list(islice(it, 70))
    state = stream.state_dict()
    shards.opened.clear()
    resumed = make(shards, shuffle_buffer=4)
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert sum(shards.opened.values()) <= 3  # buffered shards + the current one, not the whole epoch


def test_dataloader_workers_resume_from_seq():
    shards = FakeShards([6, 5, 7, 4])
    kw = dict(num_workers=2, shuffle_buffer=3)

    def run(stream, n=None):
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        return list(islice(loader, n)) if n else list(loader)

    full = run(make(shards, **kw))
    head = run(make(shards, **kw), 5)
    consumed = [0, 0]
    for s in head:
        consumed[s["__worker__"]] = max(consumed[s["__worker__"]], s["__seq__"] + 1)
    stream = make(shards, **kw)
    resumed = make(shards, **kw)
    resumed.load_state_dict(stream.make_state(0, consumed))
    tail = run(resumed)
    assert sorted(keys(head) + keys(tail)) == sorted(keys(full))
    for w in (0, 1):  # each lane continues exactly in order
        lane = [s["key"] for s in full if s["__worker__"] == w]
        got = [s["key"] for s in head + tail if s["__worker__"] == w]
        assert got == lane


def test_world_size_change_is_refused_or_restarts_next_epoch():
    shards = FakeShards([4] * 6)
    stream = make(shards, world_size=2)
    list(islice(iter(stream), 3))
    state = stream.state_dict()
    other = make(shards, world_size=3)
    with pytest.raises(StreamStateError, match="world_size: saved 2, now 3"):
        other.load_state_dict(state)
    other.load_state_dict(state, allow_restart_epoch=True)
    assert other.epoch == 1 and other.consumed == [0]


def test_short_shard_is_completed_and_counted():
    shards = FakeShards([5, 5, 5, 5], short={2: 2})
    streams = [make(shards, rank=r, world_size=2) for r in (0, 1)]
    lengths = [len(list(s)) for s in streams]
    assert lengths == [10, 10]
    assert sum(s.counters["short_shard_repeats"] for s in streams) == 3


def test_empty_shard_is_replaced_and_counted_and_fatal_only_when_nothing_reads():
    # An unreadable shard (e.g. a corrupt tar) fills its slots from the lane's other shards: never fatal...
    stream = make(FakeShards([3, 3], short={1: 0}))
    assert len(list(stream)) == 6 and stream.counters["unreadable_shard"] == 1
    # ...unless no shard of the lane yields anything: then the error names the file.
    with pytest.raises(StreamError, match="shard-00000[01].tar"):
        list(make(FakeShards([3, 3], short={0: 0, 1: 0})))


def test_too_few_shards_for_lanes():
    shards = FakeShards([3, 3])
    with pytest.raises(StreamError, match="write at least 4 shards"):
        make(shards, world_size=2, num_workers=2)
    stream = make(shards, world_size=2, num_workers=2, resampled=True)
    assert len(list(stream)) == 2 * stream.epoch_length(0)


def test_resampled_is_deterministic_and_resumable():
    shards = FakeShards(UNEVEN)
    kw = dict(rank=0, world_size=2, resampled=True)
    full = keys(make(shards, **kw))
    assert len(full) == sum(UNEVEN) // 2
    s = make(shards, **kw)
    head = keys(islice(iter(s), 6))
    r = make(shards, **kw)
    r.load_state_dict(s.state_dict())
    assert head + keys(r) == full


def test_real_tar_shards_with_manifest(tmp_path):
    import webdataset

    counts = [3, 2, 4]
    shards = []
    for s, c in enumerate(counts):
        name = f"shard-{s:06d}.tar"
        with webdataset.TarWriter(str(tmp_path / name)) as w:
            for i in range(c):
                meta = {"clip_id": f"c{s}x{i}", "identity_id": "id", "fps": 25 / 6, "frame_indices": [0, 1]}
                w.write(
                    {"__key__": f"c{s}x{i}", "0000.jpg": b"a", "0001.jpg": b"b", "json": json.dumps(meta)}
                )
        shards.append({"name": name, "samples": c})
    manifest = {"shards": shards}
    dataset = open_dataset(str(tmp_path), read_manifest=lambda url: manifest)
    assert list(dataset.sample_counts) == counts
    stream = ClipStream.from_dataset(dataset, StreamConfig(shuffle_buffer=2))  # default reader
    samples = list(stream)
    assert sorted(s["key"] for s in samples) == sorted(
        f"c{s}x{i}" for s, c in enumerate(counts) for i in range(c)
    )
    assert samples[0]["frames"] == [b"a", b"b"]
    braced = open_dataset(str(tmp_path / "shard-{000000..000002}.tar"))
    assert braced.sample_counts == dataset.sample_counts and braced.shard_urls == dataset.shard_urls
    assert braced.manifest is None


def test_config_validation():
    with pytest.raises(ConfigError, match="data.equalize"):
        from_dict(StreamConfig, {"equalize": "pad"}, prefix="data.")


def test_an_empty_dataset_url_is_a_config_error():
    with pytest.raises(ConfigError, match="'data.url' is empty"):
        open_dataset(StreamConfig().url)


class CheckedShards(FakeShards):
    """FakeShards whose reader takes the manifest sha256 and fails shard ``bad`` at its end, the way
    data_shards.read does: after yielding its samples (streamed) or before any (buffered)."""

    def __init__(self, counts, bad: int, streamed: bool):
        super().__init__(counts)
        self.digests = [f"sha-{s}" for s in range(len(counts))]
        self.bad_url, self.streamed = self.urls[bad], streamed
        self.checked: Counter = Counter()

    def __call__(self, url, sha256=None):
        from data_shards.read import ShardIntegrityError

        self.opened[url] += 1
        if sha256 is not None:
            self.checked[url] += 1
        if url == self.bad_url and sha256 is not None and not self.streamed:
            raise ShardIntegrityError(url, sha256, "other", 0)
        yield from self.data[url]
        if url == self.bad_url and sha256 is not None:
            raise ShardIntegrityError(url, sha256, "other", len(self.data[url]))


@pytest.mark.parametrize("streamed", [False, True])
def test_a_shard_failing_its_sha256_is_replaced_and_not_read_again(streamed):
    shards = CheckedShards([4] * 6, bad=2, streamed=streamed)
    world = 2
    streams = [
        ClipStream(
            shards.urls,
            shards.counts,
            rank=r,
            world_size=world,
            shuffle_buffer=3,
            read_shard=shards,
            shard_sha256=shards.digests,
        )  # fmt: skip
        for r in range(world)
    ]
    used = []  # (epoch, rank) that used samples of the bad shard
    for epoch in range(4):
        per_rank = [keys(s) for s in streams]
        assert len({len(k) for k in per_rank}) == 1  # lanes stay equal: collectives never hang
        used += [(epoch, r) for r, ks in enumerate(per_rank) if any(k.startswith("s2-") for k in ks)]
    if streamed:  # used until a rank finds it out at the shard's end, then never again by that rank
        assert used and len({r for _, r in used}) == len(used)
    else:  # checked before its first sample: never used
        assert not used
    assert all(s.bad_shards <= {shards.bad_url} for s in streams) and any(s.bad_shards for s in streams)
    # Found out at most once per rank (each rank remembers it), then never opened again.
    assert 1 <= shards.opened[shards.bad_url] <= world
    assert sum(s.counters["unreadable_shard"] for s in streams) >= 2
    assert all(shards.checked[u] for u in shards.urls)  # every shard was handed its sha256


def test_without_digests_or_with_a_reader_that_takes_none_nothing_is_checked():
    shards = CheckedShards([4] * 4, bad=1, streamed=True)
    plain = ClipStream(shards.urls, shards.counts, read_shard=shards)
    assert len(keys(plain)) == 16 and not shards.checked and not plain.bad_shards
    legacy = FakeShards([4] * 4)  # read_shard(url) only: the digests cannot be passed, the stream still works
    stream = ClipStream(legacy.urls, legacy.counts, read_shard=legacy, shard_sha256=["x"] * 4)
    assert len(keys(stream)) == 16
