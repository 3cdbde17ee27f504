"""SynthFace: determinism, ground-truth formats, smooth time, disjoint identities, strong identity cues and
expression classes learnable from landmarks on held-out people."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from common.errors import ConfigError
from data_shards.labels import EXPRESSIONS
from data_shards.synth import (
    AU_NAMES,
    EVAL_IDENTITY_OFFSET,
    SynthConfig,
    generate_clip,
    identity_range,
    iter_clips,
    iter_eval_frames,
    render_contact_sheet,
    simulate_clip,
)
from data_shards.synth.cli import add_synth_arguments, config_from_args
from data_shards.synth.geometry import aligned_shapes, face_geometry
from data_shards.synth.identity import make_identity
from data_shards.synth.render import FaceRenderer
from data_shards.synth.timeline import still_timeline

SMALL = dict(identities=2, clips_per_identity=2, seconds=3.0, size=64)


def test_same_seed_same_bytes_other_seed_differs():
    a = generate_clip(SynthConfig(seed=5, **SMALL), 3, 1)
    b = generate_clip(SynthConfig(seed=5, **SMALL), 3, 1)
    c = generate_clip(SynthConfig(seed=6, **SMALL), 3, 1)
    assert a.key == "synth-i0000003-c001" and "." not in a.key
    assert b"".join(f.tobytes() for f in a.frames) == b"".join(f.tobytes() for f in b.frames)
    assert json.dumps(a.meta) == json.dumps(b.meta)
    assert any(not np.array_equal(x, y) for x, y in zip(a.frames, c.frames))


def test_clip_meta_matches_the_clips_format():
    cfg = SynthConfig(seed=1, **SMALL)
    clips = list(iter_clips(cfg))
    assert [c.key for c in clips] == [f"synth-i{i:07d}-c{j:03d}" for i in range(2) for j in range(2)]
    for clip in clips:
        meta = json.loads(json.dumps(clip.meta))  # JSON-serialisable as is
        t = len(clip.frames)
        assert t == round(3.0 * 25 / 6) == 12
        assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in clip.frames)
        assert meta["clip_id"] == clip.key and meta["source"] == "synth" and meta["size"] == 64
        assert meta["identity_id"] == clip.key.rsplit("-", 1)[0] and meta["fps"] == pytest.approx(25 / 6)
        assert meta["frame_indices"] == list(range(t))
        assert np.asarray(meta["landmarks"]).shape == (t, 68, 2)
        labels = meta["labels"]
        assert labels["au_names"] == list(AU_NAMES) and len(AU_NAMES) == 14
        for name in ("expression", "valence", "arousal", "action_units", "head_pose"):
            assert len(labels[name]) == t, name
        assert np.asarray(labels["action_units"]).shape == (t, len(AU_NAMES))
        assert np.asarray(labels["head_pose"]).shape == (t, 3)
        assert set(labels["expression"]) <= set(range(len(EXPRESSIONS)))
        va = np.asarray([labels["valence"], labels["arousal"]])
        assert np.all(np.abs(va) <= 1)


def test_landmarks_inside_the_image_for_many_people_and_frames():
    cfg = SynthConfig(identities=1, clips_per_identity=1, seconds=20.0, seed=2, size=128)
    worst_low, worst_high = np.inf, -np.inf
    for identity in range(30):
        lm = simulate_clip(cfg, identity, 0).landmarks
        assert lm.shape == (cfg.frames_per_clip, 68, 2)
        worst_low, worst_high = min(worst_low, lm.min()), max(worst_high, lm.max())
    print(f"landmark range over 30 clips: [{worst_low:.1f}, {worst_high:.1f}] px")
    assert worst_low >= 2 and worst_high <= 126


def test_expressions_change_over_a_long_clip_and_transitions_are_smooth():
    cfg = SynthConfig(identities=1, clips_per_identity=1, seconds=60.0, seed=3)
    tl = simulate_clip(cfg, 0, 0).timeline
    changes = int(np.sum(np.diff(tl.expression) != 0))
    steps = np.abs(np.diff(tl.action_units, axis=0)).max(axis=1)
    print(f"60 s clip: {changes} expression changes, max AU step {steps.max():.3f}/frame")
    assert 10 <= changes <= 30  # segments of 2-5 s
    assert len(set(tl.expression.tolist())) >= 5
    assert steps.max() <= 0.5  # a 1 s smoothstep at 25/6 fps moves an AU by at most ~0.36 + jitter
    assert steps.max() >= 0.1  # but expressions do move
    no_blend = SynthConfig(identities=1, clips_per_identity=1, seconds=60.0, seed=3, transition_seconds=0.0)
    hard = np.abs(np.diff(simulate_clip(no_blend, 0, 0).timeline.action_units, axis=0)).max()
    assert hard > steps.max()  # the transition is what keeps the steps small


def test_pretrain_and_eval_identities_are_disjoint():
    pretrain, evaluation = identity_range("pretrain", 5000), identity_range("eval", 5000)
    assert evaluation.start == EVAL_IDENTITY_OFFSET and not set(pretrain) & set(evaluation)
    cfg = SynthConfig(
        identities=3, clips_per_identity=1, seconds=2.0, seed=0, size=64, identity_offset=evaluation.start
    )
    frames = list(iter_eval_frames(cfg, frames_per_clip=3))
    assert len(frames) == 9 and len({f.key for f in frames}) == 9
    ids = {f.meta["identity_id"] for f in frames}
    assert ids == {f"synth-i{i:07d}" for i in range(EVAL_IDENTITY_OFFSET, EVAL_IDENTITY_OFFSET + 3)}
    train_ids = {c.meta["identity_id"] for c in iter_clips(SynthConfig(seed=0, **SMALL))}
    assert not ids & train_ids
    meta = frames[0].meta
    assert set(meta) == {
        "identity_id",
        "expression",
        "valence",
        "arousal",
        "landmarks",
        "landmarks_exact",
        "source",
        "clip_id",
        "split",
    }
    assert meta["split"] == "eval" and np.asarray(meta["landmarks"]).shape == (68, 2)
    assert frames[0].image.shape == (64, 64, 3)
    with pytest.raises(ConfigError, match="split"):
        identity_range("val", 3)


def _colour_feature(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((6, 6), Image.BOX), np.float32).ravel()


def test_identity_cues_are_strong():
    """Two different clips of a person look more alike than any other person: tiny colour thumbnails suffice."""
    cfg = SynthConfig(identities=1, clips_per_identity=1, seconds=4.0, seed=4, size=64)
    gallery, probe = [], []
    for identity in range(20):
        gallery.append(_colour_feature(generate_clip(cfg, identity, 0).frames[0]))
        probe.append(_colour_feature(generate_clip(cfg, identity, 1).frames[-1]))
    dist = np.linalg.norm(np.stack(probe)[:, None] - np.stack(gallery)[None], axis=2)
    accuracy = float(np.mean(dist.argmin(1) == np.arange(20)))
    print(f"identity nearest-neighbour accuracy on 6x6 colour thumbnails: {accuracy:.2f}")
    assert accuracy >= 0.95


def _labelled_landmarks(seed: int, identities: range) -> tuple[np.ndarray, np.ndarray]:
    cfg = SynthConfig(identities=1, clips_per_identity=1, seconds=30.0, seed=seed)
    shapes, labels = [], []
    for identity in identities:
        sim = simulate_clip(cfg, identity, 0)
        shapes.append(sim.landmarks)
        labels.append(sim.timeline.expression)
    return aligned_shapes(np.concatenate(shapes)), np.concatenate(labels)


def test_expressions_are_learnable_from_landmarks_on_held_out_people():
    train_x, train_y = _labelled_landmarks(7, identity_range("pretrain", 40))
    test_x, test_y = _labelled_landmarks(7, identity_range("eval", 20))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    # Multinomial logistic regression by full-batch gradient descent (numpy, a few hundred steps).
    classes = len(EXPRESSIONS)
    weights, bias = np.zeros((train_x.shape[1], classes)), np.zeros(classes)
    onehot = np.eye(classes)[train_y]
    for _ in range(300):
        logits = train_x @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(train_x)
        weights -= 0.5 * (train_x.T @ grad + 1e-3 * weights)
        bias -= 0.5 * grad.sum(0)
    accuracy = float(np.mean((test_x @ weights + bias).argmax(1) == test_y))
    print(f"8-class accuracy from aligned landmarks on 20 held-out identities: {accuracy:.3f} (chance 0.125)")
    assert accuracy >= 0.5


def test_rendering_follows_the_landmarks():
    """The open mouth of a surprised face is dark exactly where the inner-lip landmarks say it is."""
    ident = make_identity(0, 1)
    geom = face_geometry(ident, still_timeline(EXPRESSIONS.index("Surprise")).action_units[0], size=128)
    image = FaceRenderer(ident, 128).render(geom).astype(np.float32)
    inside = geom.landmarks[[62, 66]].mean(0).round().astype(int)
    lips = geom.landmarks[51].round().astype(int) + [0, 1]
    assert image[inside[1], inside[0]].sum() < 0.6 * image[lips[1], lips[0]].sum()


def test_validate_names_the_bad_key():
    for kwargs, key in (
        ({"identities": 0}, "identities"),
        ({"size": 8}, "size"),
        ({"intensity": (0.8, 0.2)}, "intensity"),
        ({"segment_seconds": (2.0, 1.0)}, "segment_seconds"),
        ({"fps": 0.0}, "fps"),
        ({"expression_scale": 5.0}, "expression_scale"),
        ({"zoom": 2.0}, "zoom"),
    ):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            SynthConfig(**kwargs).validate()


def test_cli_arguments_and_contact_sheet(tmp_path):
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    cfg = config_from_args(
        parser.parse_args(["--identities", "3", "--seconds", "4", "--seed", "9", "--size", "96"])
    )
    assert (cfg.identities, cfg.seconds, cfg.seed, cfg.size, cfg.identity_offset) == (3, 4.0, 9, 96, 0)
    with pytest.raises(ConfigError, match="'seconds'"):
        config_from_args(parser.parse_args(["--seconds", "0"]))
    cfg = config_from_args(parser.parse_args(["--expression-scale", "1", "--zoom", "1"]))
    assert (cfg.expression_scale, cfg.zoom) == (1.0, 1.0)
    out = render_contact_sheet(tmp_path / "sheet.png", seed=1, identities=2, size=64)
    with Image.open(out) as sheet:
        assert sheet.size[0] >= 8 * 64 and sheet.size[1] >= 3 * 64


def test_expression_scale_and_zoom_change_the_drawing_not_the_labels():
    """The visibility knobs move and enlarge the face; labels stay the same and landmarks stay in the image."""
    metas, spans = [], []
    for scale, zoom in ((1.0, 1.0), (3.0, 1.35)):
        cfg = SynthConfig(
            identities=1, clips_per_identity=1, seconds=20.0, seed=2, expression_scale=scale, zoom=zoom
        )
        worst_low, worst_high = np.inf, -np.inf
        for identity in range(12):
            sim = simulate_clip(cfg, identity, 0)
            worst_low, worst_high = min(worst_low, sim.landmarks.min()), max(worst_high, sim.landmarks.max())
        assert worst_low >= 2 and worst_high <= 126, (scale, zoom, worst_low, worst_high)
        sim = simulate_clip(cfg, 0, 0)
        metas.append(sim.timeline)
        spans.append(
            np.ptp(sim.landmarks[:, 48:68, 1], axis=0).mean()
        )  # how far the mouth moves over the clip
    assert np.array_equal(metas[0].expression, metas[1].expression)
    assert np.array_equal(metas[0].action_units, metas[1].action_units)
    assert spans[1] > 2 * spans[0]


def test_shards_carry_detector_like_landmarks_and_keep_the_exact_ones_as_labels(tmp_path):
    """Detector-like by default: off the exact points by about dlib's error (NME ~0.09 inter-ocular),
    correlated along the clip, seeded; ``landmarks=exact`` gives the generator's points."""
    from data_shards.read import iter_samples
    from data_shards.synth.clip import simulate_clip
    from data_shards.write import ShardWriter

    cfg = SynthConfig(seed=3, identities=2, clips_per_identity=1, seconds=6, size=64)
    sim = simulate_clip(cfg, 0, 0)
    exact = sim.landmarks
    observed = sim.observed_landmarks(cfg)
    assert np.array_equal(observed, sim.observed_landmarks(cfg))  # seeded per clip
    iod = np.linalg.norm(exact[:, 36:42].mean(1) - exact[:, 42:48].mean(1), axis=1)
    nme = (np.linalg.norm(observed - exact, axis=2) / iod[:, None]).mean()
    assert 0.05 < nme < 0.15, nme
    step = np.linalg.norm(np.diff(observed - exact, axis=0), axis=2).mean()
    jump = np.linalg.norm(observed - exact, axis=2).mean()
    assert step < jump  # errors drift along the clip rather than jump each frame
    exact_cfg = SynthConfig(**{**cfg.__dict__, "landmarks": "exact"})
    assert np.array_equal(sim.observed_landmarks(exact_cfg), exact)

    url = str(tmp_path / "clips")
    with ShardWriter(url, "clips", "pretrain", {}) as writer:
        for clip in iter_clips(cfg):
            writer.write(clip.key, [b"\xff\xd8x"] * len(clip.frames), clip.meta)
    sample = next(iter_samples(f"{url}/shard-000000.tar"))
    assert sample["meta"]["landmarks_source"] == "detector"
    np.testing.assert_allclose(sample["meta"]["landmarks"], observed, atol=0.01)
    assert "landmarks_exact" not in sample["meta"]  # a separate member: training never parses it
