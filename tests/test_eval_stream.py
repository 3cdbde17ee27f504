"""Streaming evaluation (``eval/stream.py``): the same features, labels and probe results as the in-memory path,
with at most one chunk of JPEGs resident, on a toy dataset with a corrupt JPEG and a clip sample in it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

for _key, _value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """6 identities x 12 frames (72 usable) in shards of 64 samples, plus a broken JPEG and a clip sample."""
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
    torch.manual_seed(0)
    (root / "a").mkdir()
    ckpt = save_backbone(build_backbone(ModelConfig(arch="resnet18", width=8)), root / "a" / "backbone.pt")
    return url, str(ckpt)


def test_streamed_features_and_labels_equal_the_in_memory_path(inputs):
    from eval.data import load_frames
    from eval.features import FeatureConfig, extract_features
    from eval.stream import stream_features

    url, ckpt = inputs
    cfg = FeatureConfig(resize=40, crop=32, batch_size=16)
    data = load_frames(url)
    streamed = stream_features(ckpt, url, cfg)
    assert len(data) == 73 and data.skipped == {"corrupt_jpeg": 1}
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


@pytest.fixture(scope="module")
def local_ray(request):
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=200_000_000,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
        request.session.addfinalizer(ray.shutdown)
    return ray


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
