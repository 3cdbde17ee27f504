"""DALI index files: the same text DALI's own wds2idx writes, and fn.readers.webdataset reads the shard with it."""

from __future__ import annotations

import numpy as np

from data_shards.dali_index import write_index
from data_shards.synth import SynthConfig, iter_clips
from data_shards.write import ShardWriter


def _write(url, max_samples: int = 8):
    """Three small SynthFace clips written by the project's writer, ``max_samples`` per shard."""
    cfg = SynthConfig(identities=3, clips_per_identity=1, seconds=2.0, size=32, seed=0)
    with ShardWriter(str(url), "clips", "pretrain", {}, max_samples=max_samples) as writer:
        for clip in iter_clips(cfg):
            writer.write_clip(clip)


def _shard(tmp_path):
    _write(tmp_path / "clips")
    return tmp_path / "clips" / "shard-000000.tar"


def test_index_matches_dalis_own_tool(tmp_path):
    from wds2idx import IndexCreator

    shard = _shard(tmp_path)
    ours = write_index(shard, tmp_path / "ours.idx").read_text()
    with IndexCreator(str(shard), str(tmp_path / "dali.idx"), verbose=False) as creator:
        creator.create_index()
    assert ours == (tmp_path / "dali.idx").read_text()
    assert ours.startswith("v1.2 3\n")


def test_dali_webdataset_reader_reads_the_shard_with_the_index(tmp_path):
    from nvidia.dali import fn, pipeline_def

    shard = _shard(tmp_path)
    index = write_index(shard)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read():
        return fn.readers.webdataset(
            paths=[str(shard)], index_paths=[str(index)], ext=["json"], missing_component_behavior="error"
        )

    pipe = read()
    pipe.build()
    keys = []
    for _ in range(3):
        (json_bytes,) = pipe.run()
        keys.append(bytes(np.asarray(json_bytes[0])).decode())
    assert ['"clip_id":"synth-i0000000-c000"' in keys[0], '"synth-i0000001-c000"' in keys[1]] == [True, True]


def test_the_writer_publishes_an_index_beside_each_shard_and_cleans_it_with_its_version(tmp_path):
    url = tmp_path / "clips"
    _write(url, max_samples=2)
    shards = sorted(p.name for p in url.glob("*.tar"))
    assert sorted(p.name for p in url.glob("*.idx")) == [s.replace(".tar", ".idx") for s in shards]
    assert (url / "shard-000000.idx").read_text() == write_index(
        url / "shard-000000.tar", tmp_path / "x"
    ).read_text()
    _write(url, max_samples=4)  # a new version replaces it
    assert sorted(p.stem for p in url.glob("*.idx")) == sorted(p.stem for p in url.glob("*.tar"))
