"""DALI graphs (pretrain/pipelines/dali_graph.py): the CPU twin runs here; the GPU graph is defined and its
build fails only for want of a GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ellipse_masks
from pretrain.faceswap import toy_faces
from pretrain.pipelines.dali_graph import PARAM_NAMES, build_dali_pipeline, dali_iterator

BATCH = 8


@pytest.fixture(scope="module")
def frames():
    images, lm = toy_faces(2 * BATCH, 128, torch.Generator().manual_seed(0))
    jpegs = []
    for array in images.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=92)
        jpegs.append(buf.getvalue())
    return jpegs, lm.numpy()


def batches(frames, family: int):
    jpegs, lm = frames
    return [(jpegs[i : i + BATCH], lm[i : i + BATCH], np.full(BATCH, family)) for i in (0, BATCH)]


def run(source, cfg=None, seed=7, epochs=1):
    it = dali_iterator(build_dali_pipeline(cfg or AugmentConfig(), "cpu", BATCH, 1, None, seed, source))
    out = []
    for epoch in range(epochs):
        if epoch:
            it.reset()
        out += [(b[0]["images"], b[0]["params"]) for b in it]
    return out


def test_cpu_pipeline_shapes_normalisation_and_epochs(frames):
    out = run(batches(frames, 0), epochs=2)
    assert len(out) == 4  # cycle="raise": the second epoch is not silently empty
    images, params = out[0]
    assert images.shape == (BATCH, 3, 112, 112) and images.dtype == torch.float32
    assert params.shape == (BATCH, len(PARAM_NAMES))
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert images.min() >= lo - 1e-4 and images.max() <= hi + 1e-4
    assert -1.0 < images.mean() < 1.0
    crop = params[:, :2]
    assert crop.min() >= 0 and crop.max() <= 16
    # Epoch 2 draws new augmentations (and new mask regions) for the same frames.
    assert not torch.equal(out[0][0], out[2][0])


def test_cpu_pipeline_is_deterministic_with_a_seed(frames):
    a, b = run(batches(frames, 1), seed=3), run(batches(frames, 1), seed=3)
    c = run(batches(frames, 1), seed=4)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


def test_families_differ(frames):
    cfg = AugmentConfig(jitter_p=0.0)  # only the first family (anchors) is jittered, always
    first, second = run(batches(frames, 0), cfg), run(batches(frames, 1), cfg)
    jitter = PARAM_NAMES.index("jitter")
    assert bool((first[0][1][:, jitter] == 1).all()) and bool((second[0][1][:, jitter] == 0).all())
    assert not torch.equal(first[0][0], second[0][0])


def test_plain_crop_matches_the_decoded_pixels(frames):
    cfg = AugmentConfig(flip_p=0.0, jitter_p=0.0, jitter_always_first_family=False, blur_p=0.0, gray_p=0.0,
                        mask_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # fmt: skip
    images, params = run(batches(frames, 1), cfg)[0]
    decoded = np.asarray(Image.open(io.BytesIO(frames[0][0])).convert("RGB"), dtype=np.float32) / 255
    x, y = params[0, :2].long().tolist()
    expected = torch.from_numpy(decoded[y : y + 112, x : x + 112]).permute(2, 0, 1)
    # Same crop origin as reported in params (a one-pixel shift costs ~5 grey levels here); decoders may differ.
    assert (images[0] - expected).abs().mean() < 0.5 / 255


def test_landmark_mask_fills_the_drawn_ellipse_with_the_mean(frames):
    cfg = AugmentConfig(flip_p=0.0, jitter_p=0.0, jitter_always_first_family=False, blur_p=0.0, gray_p=0.0,
                        mask_p=1.0, crop=128, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # fmt: skip
    images, params = run(batches(frames, 1), cfg, seed=11)[0]
    assert bool((params[:, PARAM_NAMES.index("mask")] == 1).all())
    gen = torch.Generator().manual_seed(11)  # MaskedFeed's draws: coins, then regions
    torch.rand(BATCH, generator=gen)
    region = torch.randint(0, 3, (BATCH,), generator=gen)
    inside = ellipse_masks(
        torch.from_numpy(frames[1][:BATCH]), region, 128, 128, cfg.mask_scale, cfg.mask_min_aspect
    )
    for i in range(BATCH):
        decoded = np.asarray(Image.open(io.BytesIO(frames[0][i])).convert("RGB"), dtype=np.float32) / 255
        decoded = torch.from_numpy(decoded).permute(2, 0, 1)
        changed = (images[i] - decoded).abs().amax(dim=0) > 1.5 / 255
        assert bool((changed <= inside[i]).all()) and changed.sum() > 0.5 * inside[i].sum()
        fill = images[i][:, inside[i]]
        assert (fill - decoded.mean(dim=(1, 2))[:, None]).abs().max() < 1.5 / 255


def test_gpu_graph_is_defined_and_fails_only_for_want_of_a_gpu(frames):
    pipe = build_dali_pipeline(AugmentConfig(), "gpu", BATCH, 1, 0, 7, batches(frames, 0))
    if torch.cuda.is_available():  # on a GPU host the same graph must build and produce device tensors
        pipe.build()
        (images, _params) = pipe.run()
        assert images.is_dense_tensor() and len(images) == BATCH
        return
    with pytest.raises(RuntimeError, match="CUDA is not available|Please install GPU driver|device_id"):
        pipe.build()


def test_device_and_device_id_must_agree(frames):
    with pytest.raises(ValueError, match="device_id=None"):
        build_dali_pipeline(AugmentConfig(), "cpu", BATCH, 1, 0, 7, [])
    with pytest.raises(ValueError, match="needs a device_id"):
        build_dali_pipeline(AugmentConfig(), "gpu", BATCH, 1, None, 7, [])


def test_two_stage_decode_then_augment_from_torch_tensors(frames):
    """The training arrangement: DALI decode -> (torch FaceSwap) -> DALI augmentation fed from torch tensors,
    with the crop/flip parameters drawn by torch: DALI's views are exactly the drawn crops and flips."""
    from pretrain.augment import ViewAugmenter, ViewParams
    from pretrain.decode import decode_jpegs
    from pretrain.pipelines.dali_graph import DaliStages

    cfg = AugmentConfig(flip_p=0.5, jitter_p=0.0, jitter_always_first_family=False, blur_p=0.0, gray_p=0.0,
                        mask_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # fmt: skip
    stages = DaliStages(cfg, torch.device("cpu"), BATCH, 128, 1, seed=5)
    jpegs = frames[0][:BATCH]
    decoded = stages.decode(jpegs)
    assert decoded.shape == (BATCH, 3, 128, 128) and decoded.dtype == torch.uint8
    assert (decoded.float() - decode_jpegs(jpegs).float()).abs().mean() < 1.0  # libjpeg flavours may differ
    with pytest.raises(RuntimeError):
        stages.decode([jpegs[0][:100]] * BATCH)  # corrupt: raises, and the stage keeps working
    swapped = decoded.flip(-1).contiguous()  # stands in for the torch FaceSwap output
    masks = torch.zeros(BATCH, 128, 128, dtype=torch.bool)
    masks[0, 40:80, 40:80] = True
    gen = torch.Generator().manual_seed(3)
    draw = ViewAugmenter(cfg).draw_params
    params = ViewParams.cat(
        [draw(4, "first", gen, (1.0, 1.0), "cpu"), draw(4, "second", gen, (1.0, 1.0), "cpu")]
    )
    assert 0 < int(params.flip.sum()) < BATCH  # both cases exercised
    views = stages.augment(swapped, masks, params)
    assert views.shape == (BATCH, 3, 112, 112) and views.dtype == torch.float32
    inside = views[0][:, 45:55, 45:55]  # crop origin <= 16: still inside the masked square
    assert (inside - swapped[0].float().mean(dim=(1, 2))[:, None, None] / 255).abs().max() < 2 / 255
    for i in range(1, BATCH):  # unmasked rows: exactly the drawn crop (and flip) of the fed tensor
        x, y = params.offset[i].tolist()
        crop = swapped[i, :, y : y + 112, x : x + 112].float() / 255
        expected = crop.flip(-1) if params.flip[i] else crop
        assert torch.allclose(views[i], expected, atol=1e-6), i
    again = stages.augment(swapped, masks, params)
    assert torch.equal(views, again)  # no hidden DALI randomness: same parameters, same views


def test_decode_stage_resizes_only_frames_of_another_size(frames):
    """Frames stored at image_size pass untouched (no same-size resample); others are resized to it."""
    from pretrain.decode import decode_jpegs
    from pretrain.pipelines.dali_graph import DaliStages

    stages = DaliStages(AugmentConfig(), torch.device("cpu"), BATCH, 128, 1, seed=5)
    jpegs = list(frames[0][:BATCH])
    same = stages.decode(jpegs)
    odd = {}
    for i, size in ((1, 160), (6, 96)):
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpegs[i])).resize((size, size), Image.BILINEAR).save(
            buf, format="JPEG", quality=92
        )
        odd[i] = jpegs[i] = buf.getvalue()
    mixed = stages.decode(jpegs)
    assert mixed.shape == (BATCH, 3, 128, 128)
    for i in range(BATCH):
        if i in odd:  # resized: close to the original 128 px frame, not a copy of it
            assert 0 < (mixed[i].float() - same[i].float()).abs().mean() < 12
        else:
            assert torch.equal(mixed[i], same[i])
    assert (same.float() - decode_jpegs(frames[0][:BATCH]).float()).abs().mean() < 1.0
