"""Streaming evaluation (``eval/stream.py``): the same features, labels and probe results as the in-memory path,
with at most one chunk of JPEGs resident, on a toy dataset with a corrupt JPEG and a clip sample in it."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """6 identities x 12 frames in shards of 64 samples, a grey frame (73 usable), a broken JPEG and, in a
    shard of its own between the frames shards, a clip."""
    import torch

    from data_shards.write import ShardWriter, encode_jpeg
    from eval.data import write_toy_frames
    from pretrain.model import ModelConfig, build_backbone, save_backbone

    root = tmp_path_factory.mktemp("eval-stream")
    clean = write_toy_frames(str(root / "clean"), identities=6, per_identity=12)
    url = str(root / "hostile")
    from eval.data import load_frames

    good = load_frames(clean)
    with ShardWriter(url, "frames", "eval", {}, max_samples=64) as writer:
        for i, key in enumerate(good.keys):
            meta = {
                "identity_id": str(good.identity[i]),
                "expression": int(good.expression[i]),
                "valence": float(good.valence[i]),
                "arousal": float(good.arousal[i]),
                "clip_id": None,
            }
            writer.write(key, good.jpegs[i], meta)
            if i == 20:
                writer.write("broken", b"\xff\xd8 not a jpeg", {"identity_id": "x"})
        writer.write("grey", encode_jpeg(np.full((32, 32, 3), 128, np.uint8)), {"identity_id": "toy000"})
    _add_clip_shard(url, root / "clips", encode_jpeg(np.full((32, 32, 3), 90, np.uint8)))
    torch.manual_seed(0)
    (root / "a").mkdir()
    ckpt = save_backbone(build_backbone(ModelConfig(arch="resnet18", width=8)), root / "a" / "backbone.pt")
    return url, str(ckpt)


def _add_clip_shard(url, scratch, jpeg) -> None:
    """A shard holding one clip (no ``jpg`` member), spliced between the frames shards as a mixed-up dataset
    would have it: evaluation must leave it out and count it as ``not_a_frame``."""
    import shutil
    from pathlib import Path

    from data_shards.write import ShardWriter

    with ShardWriter(str(scratch), "clips", "eval", {}) as writer:
        writer.write("clip", [jpeg, jpeg], {"identity_id": "toy000", "frame_indices": [0, 1]})
    clip_manifest = json.loads((scratch / "manifest.json").read_text())
    entry = dict(clip_manifest["shards"][0], name="shard-clip.tar")
    for ext in ("tar", "idx"):
        shutil.copy(scratch / f"shard-000000.{ext}", Path(url) / f"shard-clip.{ext}")
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    manifest["shards"].insert(1, entry)
    (Path(url) / "manifest.json").write_text(json.dumps(manifest))


def test_streamed_features_and_labels_equal_the_in_memory_path(inputs):
    from eval.data import load_frames
    from eval.features import FeatureConfig, extract_features
    from eval.stream import stream_features

    url, ckpt = inputs
    cfg = FeatureConfig(resize=40, crop=32, batch_size=16)
    data = load_frames(url)
    streamed = stream_features(ckpt, url, cfg)
    assert len(data) == 73 and data.skipped == {"corrupt_jpeg": 1, "not_a_frame": 1}
    assert streamed.keys == data.keys and streamed.skipped == data.skipped
    assert np.array_equal(streamed.features, extract_features(ckpt, data.jpegs, cfg))  # bit for bit
    labels = data.labels()
    for name in ("expression", "valence", "arousal", "identity", "split", "clip"):
        assert np.array_equal(getattr(streamed.labels, name), getattr(labels, name), equal_nan=name in (
            "valence", "arousal")), name  # fmt: skip
    # 73 frames went through, never more than one chunk of 16 JPEGs at a time
    assert streamed.max_resident_jpegs == 16
    small = stream_features(ckpt, url, cfg, max_samples=10)
    assert small.keys == data.keys[:10] and small.max_resident_jpegs == 10


def test_the_store_is_read_at_most_one_chunk_ahead_of_the_backbone(inputs, monkeypatch):
    """Bounded memory without timing: each sample pulled from the store is counted, and so is each frame the
    backbone has embedded; the reader may run ahead by one chunk (plus the 2 samples left out), never more.
    Reading everything first (the in-memory path) would be 75 ahead."""
    import eval.stream
    from data_shards.read import iter_samples
    from eval.features import FeatureConfig, embed

    url, ckpt = inputs
    pulled, embedded, lead = [0], [0], []

    def counting_reader(shard_url):
        for sample in iter_samples(shard_url):
            pulled[0] += 1
            lead.append(pulled[0] - embedded[0])
            yield sample

    def counting_embed(backbone, jpegs, cfg):
        embedded[0] += len(jpegs)
        return embed(backbone, jpegs, cfg)

    monkeypatch.setattr(eval.stream, "embed", counting_embed)
    out = eval.stream.stream_features(
        ckpt, url, FeatureConfig(resize=40, crop=32, batch_size=8), iter_samples=counting_reader
    )
    assert (pulled[0], embedded[0], len(out.keys)) == (75, 73, 73)
    assert max(lead) <= 8 + 2 and out.max_resident_jpegs == 8


def test_an_empty_or_missing_dataset_is_one_clear_error(inputs, tmp_path):
    from common.errors import ConfigError
    from data_shards.write import ShardWriter
    from eval.stream import stream_features

    _, ckpt = inputs
    with pytest.raises(ConfigError, match="--data"):
        stream_features(ckpt, str(tmp_path / "nowhere"))
    empty = str(tmp_path / "empty")
    with ShardWriter(empty, "frames", "eval", {}) as writer:
        writer.write("junk", b"\xff\xd8broken", {"identity_id": "p"})
    with pytest.raises(ConfigError, match="has no samples"):
        stream_features(ckpt, empty)


def test_fanout_streams_and_gives_the_same_results(inputs, local_ray, tmp_path):
    """The same evaluation with stream=true (the default) and stream=false: identical metrics in every cell."""
    from eval.fanout import EvalConfig, run_eval

    url, ckpt = inputs
    docs = {}
    for stream in (True, False):
        cfg = EvalConfig(
            checkpoints=[ckpt], data=[url], seeds=2, out=str(tmp_path / str(stream)), stream=stream
        )
        cfg.features.batch_size = 16
        seen = {}
        doc = run_eval(cfg, progress=False, on_features=lambda f, lab, seen=seen: seen.update(f=f, lab=lab))
        docs[stream] = doc["results"]
        assert seen["f"][("a", "hostile")].shape[0] == 73 and seen["lab"]["hostile"] is not None
    assert json.dumps(docs[True], sort_keys=True) == json.dumps(docs[False], sort_keys=True)
    cells = docs[True]["a"]
    assert set(cells) == {"expression", "va", "identity"}
    assert all(c["hostile"]["errors"] == [] and c["hostile"]["metrics"] for c in cells.values())
