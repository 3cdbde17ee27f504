"""Probes on constructed features (perfect -> F1 1 / CCC 1, random -> chance), splits, features, fine-tune."""

from __future__ import annotations

import numpy as np
import pytest

from eval.data import (
    FramesLabels,
    carve_validation,
    gallery_probe_split,
    load_frames,
    train_test_split,
    write_toy_frames,
)
from eval.probes import ProbeConfig, identity_leakage, knn_probe, linear_probe, va_regression

CFG = ProbeConfig(weight_decays=[1e-4, 1e-2], lbfgs_max_iter=100, verification_pairs=1000)


def _labels(n_ids=12, per_id=30, seed=0):
    rng = np.random.default_rng(seed)
    identity = np.repeat([f"id{i}" for i in range(n_ids)], per_id).astype(object)
    expression = rng.integers(0, 8, size=identity.size)
    return identity, expression, rng


def test_linear_and_knn_perfect_vs_random():
    identity, y, rng = _labels()
    perfect = np.eye(8)[y] + 0.01 * rng.normal(size=(y.size, 8))
    noise = rng.normal(size=(y.size, 32))
    tr, te = np.arange(0, 240), np.arange(240, 360)  # identities 0-7 train, 8-11 test
    good = linear_probe(perfect[tr], y[tr], perfect[te], y[te], 8, CFG, seed=0, groups=identity[tr])
    assert good["metrics"]["linear_macro_f1"] == pytest.approx(1.0)
    assert np.trace(np.asarray(good["confusion"])) == te.size
    assert knn_probe(perfect[tr], y[tr], perfect[te], y[te], 8, CFG)["knn_macro_f1"] == pytest.approx(1.0)
    bad = linear_probe(noise[tr], y[tr], noise[te], y[te], 8, CFG, seed=0, groups=identity[tr])
    assert bad["metrics"]["linear_accuracy"] < 0.3  # chance = 1/8
    assert knn_probe(noise[tr], y[tr], noise[te], y[te], 8, CFG)["knn_accuracy"] < 0.3


def test_linear_probe_is_seeded():
    identity, y, rng = _labels()
    x = np.eye(8)[y] + 0.8 * rng.normal(size=(y.size, 8))
    runs = [
        linear_probe(x[:240], y[:240], x[240:], y[240:], 8, CFG, 3, identity[:240])["metrics"]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_va_regression_perfect_vs_random():
    rng = np.random.default_rng(1)
    va = rng.uniform(-1, 1, size=(300, 2))
    x = np.concatenate([va * 3 + 1, rng.normal(size=(300, 6)) * 0.001], axis=1)
    out = va_regression(x[:200], va[:200], x[200:], va[200:], ProbeConfig(), seed=0)["metrics"]
    assert out["ccc_valence"] > 0.99 and out["ccc_arousal"] > 0.99
    assert out["rmse_valence"] < 0.05
    noise = rng.normal(size=(300, 16))
    out = va_regression(noise[:200], va[:200], noise[200:], va[200:], ProbeConfig(), seed=0)["metrics"]
    assert abs(out["ccc_valence"]) < 0.25 and abs(out["ccc_arousal"]) < 0.25


def test_identity_leakage_perfect_vs_random():
    identity, _, rng = _labels(n_ids=10, per_id=10)
    _, ids = np.unique(identity, return_inverse=True)
    gallery, probe = gallery_probe_split(identity, seed=0)
    assert set(identity[gallery]) == set(identity[probe]) == set(identity)
    onehot = np.eye(10)[ids] + 0.01 * rng.normal(size=(ids.size, 10))
    out = identity_leakage(onehot, identity, gallery, probe, CFG, seed=0)["metrics"]
    assert out["id_1nn_accuracy"] == 1.0 and out["verification_auc"] > 0.99 and out["verification_eer"] < 0.01
    noise = rng.normal(size=(ids.size, 64))
    out = identity_leakage(noise, identity, gallery, probe, CFG, seed=0)["metrics"]
    assert out["id_1nn_accuracy"] < 0.3  # chance 0.1
    assert 0.4 < out["verification_auc"] < 0.6 and 0.4 < out["verification_eer"] < 0.6


def test_splits_are_identity_disjoint_and_seeded():
    identity, y, _ = _labels()
    labels = FramesLabels("x", y, y * 0.0, y * 0.0, identity, np.full(y.size, "eval", dtype=object))
    tr, te = train_test_split(labels, seed=0)
    assert not set(identity[tr]) & set(identity[te]) and len(tr) + len(te) == y.size
    assert train_test_split(labels, seed=1)[1].tolist() != te.tolist()
    fit, val = carve_validation(len(tr), 0, 0.2, identity[tr])
    assert not set(identity[tr][fit]) & set(identity[tr][val])
    # Benchmarks with their own train/test split keep it.
    split = np.where(np.arange(y.size) < 100, "test", "train").astype(object)
    tr, te = train_test_split(FramesLabels("x", y, y, y, identity, split), seed=0)
    assert te.tolist() == list(range(100))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from pretrain.model import ModelConfig, build_backbone, save_backbone

    root = tmp_path_factory.mktemp("toy")
    url = write_toy_frames(str(root / "toy-eval"), identities=4, per_identity=12)
    ckpt = save_backbone(build_backbone(ModelConfig(arch="resnet18", width=16)), root / "backbone.pt")
    return load_frames(url), str(ckpt)


def test_features_are_deterministic_and_sized(toy):
    from eval.features import FeatureConfig, extract_features

    data, ckpt = toy
    a = extract_features(ckpt, data.jpegs, FeatureConfig(batch_size=16))
    b = extract_features(ckpt, data.jpegs[:5], FeatureConfig(batch_size=2))
    assert a.shape == (len(data), 128) and a.dtype == np.float32
    np.testing.assert_allclose(a[:5], b, rtol=1e-4, atol=1e-5)
    c = extract_features(ckpt, data.jpegs[:3], FeatureConfig(resize=64, crop=56))
    assert c.shape == (3, 128)


def test_finetune_one_epoch_on_cpu(toy):
    from eval.finetune import FinetuneConfig, finetune

    data, ckpt = toy
    y = data.expression
    cfg = FinetuneConfig(epochs=1, batch_size=8, device="cpu")
    out = finetune(
        ckpt, data.jpegs[:36], y[:36], data.jpegs[36:], y[36:], 8, cfg, seed=0, groups=data.identity[:36]
    )
    assert set(out["metrics"]) >= {"ft_macro_f1", "ft_accuracy", "ft_best_epoch"}
    assert 0.0 <= out["metrics"]["ft_accuracy"] <= 1.0
    assert np.asarray(out["confusion"]).sum() == 12 and len(out["history"]) == 1


def test_identity_leakage_is_measured_across_clips_not_within_one():
    """Features that only remember the clip (near-duplicate frames) but carry no identity: a per-frame split
    matches frames of one clip and reports identity; the clip-disjoint split reports chance."""
    from eval.probes import verification_pairs

    rng = np.random.default_rng(1)
    n_ids, clips_per_id, frames = 20, 4, 6
    identity = np.repeat([f"id{i}" for i in range(n_ids)], clips_per_id * frames).astype(object)
    clip = np.repeat([f"c{i}" for i in range(n_ids * clips_per_id)], frames).astype(object)
    clip_code = rng.normal(size=(n_ids * clips_per_id, 32))
    _, clip_index = np.unique(clip, return_inverse=True)
    features = clip_code[clip_index] + 0.05 * rng.normal(size=(clip.size, 32))

    gallery, probe = gallery_probe_split(identity, seed=0, clip=clip)
    assert not set(clip[gallery]) & set(clip[probe])
    assert set(identity[gallery]) == set(identity[probe]) == set(identity)
    pairs, same = verification_pairs(identity, 1000, seed=0, clip=clip)
    assert same.any() and (clip[pairs[same, 0]] != clip[pairs[same, 1]]).all()

    disjoint = identity_leakage(features, identity, gallery, probe, CFG, seed=0, clip=clip)["metrics"]
    g_frames, p_frames = gallery_probe_split(identity, seed=0)  # per frame: the old, leaky protocol
    per_frame = identity_leakage(features, identity, g_frames, p_frames, CFG, seed=0)["metrics"]
    assert per_frame["id_1nn_accuracy"] > 0.95 and per_frame["verification_auc"] > 0.6
    assert disjoint["id_1nn_accuracy"] < 0.2  # chance 1/20
    assert 0.4 < disjoint["verification_auc"] < 0.6


def test_frames_data_reads_clip_ids(tmp_path):
    from data_shards.write import ShardWriter, encode_jpeg

    url = str(tmp_path / "eval")
    rng = np.random.default_rng(0)

    jpeg = encode_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    with ShardWriter(url, "frames", "eval", {}) as writer:
        writer.write("a", jpeg, {"identity_id": "p", "clip_id": "clipA"})
        writer.write("b", jpeg, {"identity_id": "p", "clip_id": None})
    data = load_frames(url)
    assert list(data.labels().clip) == ["clipA", "b"]
