"""Batched view augmentations (pretrain/augment.py) and batched JPEG decode (pretrain/decode.py), on the CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.configio import from_dict
from common.errors import ConfigError
from pretrain.augment import (
    MASK_REGIONS,
    AugmentConfig,
    ViewAugmenter,
    ellipse_masks,
    gaussian_blur_per_sample,
    saturation_hue_matrices,
)
from pretrain.decode import CorruptImage, decode_jpegs, decode_jpegs_skipping
from pretrain.faceswap import toy_faces

PLAIN = dict(  # every op off, no normalisation: outputs are input pixels / 255
    flip_p=0.0, jitter_p=0.0, jitter_always_first_family=False, blur_p=0.0, gray_p=0.0, mask_p=0.0,
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
)  # fmt: skip


@pytest.fixture(scope="module")
def faces():
    return toy_faces(12, 128, torch.Generator().manual_seed(0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_dtypes_and_channels_last(faces):
    images, lm = faces
    out = ViewAugmenter(AugmentConfig(channels_last=True))(images, lm, "first", gen())
    assert out.shape == (12, 3, 112, 112) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    # ImageNet-normalised range.
    assert out.min() >= -2.2 and out.max() <= 2.7


def test_deterministic_given_generator(faces):
    images, lm = faces
    aug = ViewAugmenter()
    a, b = aug(images, lm, "second", gen(5)), aug(images, lm, "second", gen(5))
    c = aug(images, lm, "second", gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_crop_and_flip_are_exact_pixels(faces):
    images, lm = faces
    aug = ViewAugmenter(AugmentConfig(**{**PLAIN, "flip_p": 1.0}))
    out, p = aug(images, lm, "second", gen(1), return_params=True)
    assert bool(p.flip.all())
    for i in range(3):
        x, y = p.offset[i].tolist()
        expected = images[i, :, y : y + 112, x : x + 112].flip(-1).float() / 255
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)


def test_map_landmarks_follows_the_pixels(faces):
    images, lm = faces
    marked = images.clone()
    marked[:, :, 60, 70] = torch.tensor([255, 0, 255], dtype=torch.uint8)[
        None, :
    ]  # a magenta dot at (70, 60)
    aug = ViewAugmenter(AugmentConfig(**{**PLAIN, "flip_p": 0.5}))
    out, p = aug(marked, lm, "second", gen(2), return_params=True)
    mapped = p.map_landmarks(torch.tensor([[[70.0, 60.0]]]).expand(12, 1, 2))[:, 0].round().long()
    for i in range(12):
        x, y = mapped[i].tolist()
        torch.testing.assert_close(out[i, :, y, x], torch.tensor([1.0, 0.0, 1.0]))


def test_resize_path_accepts_other_sizes(faces):
    images, lm = faces
    big = torch.nn.functional.interpolate(images.float(), size=160).to(torch.uint8)
    out, p = ViewAugmenter()(big, lm * 1.25, "first", gen(), return_params=True)
    assert out.shape == (12, 3, 112, 112) and p.scale == (0.8, 0.8)


def test_grayscale_gives_equal_channels(faces):
    images, lm = faces
    out = ViewAugmenter(AugmentConfig(**{**PLAIN, "gray_p": 1.0}))(images, lm, "second", gen())
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])


def test_mask_fills_an_ellipse_over_the_chosen_region_with_the_mean(faces):
    images, lm = faces
    cfg = AugmentConfig(**{**PLAIN, "mask_p": 1.0, "crop": 128})  # crop = resize: the whole image comes back
    out, p = ViewAugmenter(cfg)(images, lm, "second", gen(3), return_params=True)
    assert set(p.mask_region.tolist()) == {0, 1, 2}
    x = images.float() / 255
    mean = x.mean(dim=(2, 3))
    for i in range(12):
        changed = (out[i] - x[i]).abs().amax(dim=0) > 1e-6
        ys, xs = changed.nonzero(as_tuple=True)
        region = lm[i, list(MASK_REGIONS[int(p.mask_region[i])])]
        centre = (region.amin(0) + region.amax(0)) / 2
        # The changed pixels form a blob centred on the chosen landmarks and are the image's mean colour.
        assert abs(xs.float().mean() - centre[0]) < 2 and abs(ys.float().mean() - centre[1]) < 2
        torch.testing.assert_close(out[i][:, changed], mean[i][:, None].expand(3, int(changed.sum())))
        inside = ellipse_masks(
            lm[i : i + 1], p.mask_region[i : i + 1], 128, 128, cfg.mask_scale, cfg.mask_min_aspect
        )
        assert bool((changed <= inside[0]).all())  # nothing outside the ellipse changed


def test_coin_rates_and_first_family_always_jitters():
    aug = ViewAugmenter()
    n = 4000
    first = aug.draw_params(n, "first", gen(0), (1.0, 1.0), "cpu")
    second = aug.draw_params(n, "second", gen(1), (1.0, 1.0), "cpu")
    assert bool(first.jitter.all())
    for rate, p in [
        (second.jitter, 0.8), (second.flip, 0.5), (second.blur, 0.5), (second.gray, 0.2), (second.mask, 0.8),
    ]:  # fmt: skip
        assert abs(rate.float().mean().item() - p) < 0.03
    assert int(second.offset.min()) >= 0 and int(second.offset.max()) == 16
    b = second.jitter_factors
    assert b[:, :3].min() >= 0.6 and b[:, :3].max() <= 1.4 and b[:, 3].abs().max() <= 0.2
    assert second.sigma.min() >= 0.1 and second.sigma.max() <= 2.0


def test_brightness_jitter_scales_pixels(faces):
    images, lm = faces
    cfg = AugmentConfig(**{**PLAIN, "jitter_p": 1.0, "jitter": (0.4, 0.0, 0.0, 0.0), "crop": 128})
    out, p = ViewAugmenter(cfg)(images, lm, "second", gen(4), return_params=True)
    x = images.float() / 255
    expected = (x * p.jitter_factors[:, 0, None, None, None]).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_saturation_hue_identity_and_grey_is_invariant():
    m = saturation_hue_matrices(torch.tensor([1.0, 0.3]), torch.tensor([0.0, 0.15]))
    torch.testing.assert_close(m[0], torch.eye(3), atol=1e-6, rtol=0)
    grey = torch.full((3,), 0.4)
    torch.testing.assert_close(m[1] @ grey, grey, atol=1e-5, rtol=0)  # no chroma: nothing to rotate


def test_positive_hue_turns_red_towards_yellow_as_torchvision_and_dali_do():
    from torchvision.transforms.functional import adjust_hue

    red = torch.tensor([0.8, 0.2, 0.2])
    ours = saturation_hue_matrices(torch.tensor([1.0]), torch.tensor([0.1]))[0] @ red
    theirs = adjust_hue(red.view(3, 1, 1), 0.1).flatten()
    assert ours[1] > red[1] and ours[2] < red[2]  # green up, blue down: orange, not magenta
    assert theirs[1] > red[1] and theirs[2] <= red[2]


def test_ops_touch_only_the_rows_that_drew_them(faces):
    images, lm = faces
    cfg = AugmentConfig(**{**PLAIN, "jitter_p": 0.5, "blur_p": 0.5, "gray_p": 0.5, "crop": 128})
    out, p = ViewAugmenter(cfg)(images, lm, "second", gen(2), return_params=True)
    plain = ~(p.jitter | p.blur | p.gray)
    assert 0 < int(plain.sum()) < len(plain)  # both kinds of rows in the batch: the test can fail
    torch.testing.assert_close(out[plain], images[plain].float() / 255, atol=1e-6, rtol=0)
    assert (out[~plain] - images[~plain].float() / 255).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    grey_rows = out[p.gray]
    torch.testing.assert_close(grey_rows[:, 0], grey_rows[:, 2])


def test_blur_keeps_constants_and_smooths_noise():
    x = torch.rand(4, 3, 32, 32, generator=gen())
    const = torch.full((4, 3, 32, 32), 0.3)
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0])
    torch.testing.assert_close(gaussian_blur_per_sample(const, sigma, 6), const)
    stds = gaussian_blur_per_sample(x, sigma, 6).std(dim=(1, 2, 3))
    assert bool((stds[1:] < stds[:-1]).all()) and stds[0] < x.std()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="augment.gray_p"):
        from_dict(AugmentConfig, {"gray_p": 1.5})
    with pytest.raises(ConfigError, match="augment.crop"):
        from_dict(AugmentConfig, {"crop": 200})


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_decode_batches_and_reports_corrupt_jpegs(faces):
    images, _ = faces
    arrays = images[:4].permute(0, 2, 3, 1).numpy()
    jpegs = [_jpeg(a) for a in arrays]
    out = decode_jpegs(jpegs)
    assert out.shape == (4, 3, 128, 128) and out.dtype == torch.uint8
    assert (out.float() - images[:4].float()).abs().mean() < 3  # JPEG loss only
    small = decode_jpegs(jpegs, size=64)  # uint8 antialiased resize: within a grey level of the float one
    assert small.shape == (4, 3, 64, 64) and small.dtype == torch.uint8
    via_float = F.interpolate(out.float(), size=(64, 64), mode="bilinear", antialias=True).round()
    assert (small.float() - via_float).abs().max() <= 1
    broken = jpegs[:2] + [b"not a jpeg at all"] + jpegs[2:]
    with pytest.raises(CorruptImage) as err:
        decode_jpegs(broken)
    assert err.value.index == 2
    good, bad = decode_jpegs_skipping(broken)
    assert bad == [2] and torch.equal(good, out)


@pytest.mark.parametrize("static", [False, True])
def test_pair_is_two_calls_in_one_pass(faces, static):
    """ViewAugmenter.pair (the torch pipeline's views): the same draws and values as the "first" family on the
    anchors then the "second" on the positives, for uint8 positives and for float ones (after FaceSwap)."""
    images, landmarks = faces
    aug = ViewAugmenter(AugmentConfig(mask_p=0.5, blur_p=0.5, gray_p=0.5), static=static)
    anchors, positives = images[:4], images[4:8]
    for second in (positives, positives.float() / 255.0):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        first = aug(anchors, landmarks[:4], "first", g1)
        two_calls = torch.cat([first, aug(second, landmarks[4:8], "second", g1)])
        one_pass = aug.pair(anchors, landmarks[:4], second, landmarks[4:8], g2)
        assert torch.equal(one_pass, two_calls)  # bit for bit: every pixel op is per row
        assert torch.equal(g1.get_state(), g2.get_state())  # the generator is left where two calls leave it
    with pytest.raises(ValueError, match="pair"):
        aug.pair(anchors, landmarks[:4], images[4:8, :, :64, :64], landmarks[4:8], g2)
