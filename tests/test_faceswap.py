"""Batched FaceSwap (pretrain/faceswap.py) against its per-sample NumPy/SciPy reference, on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.configio import from_dict
from common.errors import ConfigError
from pretrain.augment import gaussian_blur_per_sample
from pretrain.faceswap import (
    HULL_GROUPS,
    FaceSwap,
    FaceSwapConfig,
    _hull_distance_np,
    blur_matrices,
    blur_pooled,
    draw_donors,
    face_masks,
    face_swap,
    face_swap_reference,
    hull_signed_distance,
    similarity_transforms,
    toy_faces,
    upsample2,
)


@pytest.fixture(scope="module")
def faces():
    return toy_faces(8, 128, torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "stride, mask_mean, overall_max",
    # stride 1 is the classic full-resolution recipe: the banded blur matrices use the reference's truncated
    # kernel and mirror padding, so the two agree to float32 rounding. stride 2 computes the colour ratio on a
    # 2x2-pooled grid and upsamples it (measured here: 0.13-0.33 grey levels inside the mask, max 2.7).
    [(1, 0.01, 0.05), (2, 0.5, 4.0)],
)
def test_batched_matches_reference(faces, stride, mask_mean, overall_max):
    images, lm = faces
    cfg = FaceSwapConfig(color_stride=stride)
    src, dst = [0, 1, 2], [5, 6, 7]
    out, out_lm = face_swap(images[src].float(), lm[src], images[dst].float(), lm[dst], cfg)
    for k, (i, j) in enumerate(zip(src, dst)):
        ref, ref_lm, mask = face_swap_reference(
            images[i].permute(1, 2, 0).double().numpy(), lm[i].double().numpy(),
            images[j].permute(1, 2, 0).double().numpy(), lm[j].double().numpy(), cfg,
        )  # fmt: skip
        diff = np.abs(out[k].permute(1, 2, 0).numpy() - ref)
        assert diff[mask > 0.5].mean() < mask_mean
        assert diff.max() < overall_max
        np.testing.assert_allclose(out_lm[k].numpy(), ref_lm, atol=1e-3)
    if stride > 1:  # the test can fail: the pooled ratio is not the full-resolution one
        exact, _ = face_swap(
            images[src].float(), lm[src], images[dst].float(), lm[dst], FaceSwapConfig(color_stride=1)
        )
        assert float((exact - out).abs().max()) > 0.1


def test_blur_matrices_are_the_grouped_convolution_and_pool():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    sigma = torch.tensor([0.8, 2.0, 3.5])
    radius = 11
    full = blur_matrices(sigma, 32, radius, 1)
    blurred = blur_pooled(x, full, full)
    # each sample's kernel reaches ceil(3 sigma) pixels (3, 6, 11), as the per-sample recipe
    per_sample = [gaussian_blur_per_sample(x[i : i + 1], sigma[i : i + 1], math.ceil(3 * float(sigma[i])))
                  for i in range(3)]  # fmt: skip
    torch.testing.assert_close(blurred, torch.cat(per_sample), atol=2e-3, rtol=0)
    # a wider common width (the static, sync-free setting uses the whole frame) changes nothing
    torch.testing.assert_close(blur_matrices(sigma, 32, 31, 1), full, atol=1e-6, rtol=0)
    pooled = blur_matrices(sigma, 32, radius, 2)
    torch.testing.assert_close(blur_pooled(x, pooled, pooled), F.avg_pool2d(blurred, 2), atol=2e-3, rtol=0)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample2(x), expected, atol=1e-3, rtol=0)


def test_boxed_face_masks_equal_the_full_frame_rasterisation(faces):
    _, lm = faces
    src, dst = lm[:4].clone(), lm[4:].clone()
    dst[2] = dst[2] + 200  # far outside the frame: nothing to paint
    src[3] = 40.0  # every point at one spot: no hull (a full-frame max over no edges would paint everything)
    feather = torch.tensor([3.0, 0.0, 3.0, 3.0])
    boxed = face_masks([src, dst], 128, 128, feather)

    def full_frame(sets):
        dist = torch.stack(
            [hull_signed_distance(pts[:, list(group)], 128, 128) for pts in sets for group in HULL_GROUPS]
        ).amin(dim=0)
        return (0.5 - dist / feather.clamp_min(1e-3)[:, None, None]).clamp(0, 1)

    torch.testing.assert_close(boxed[:3, 0], full_frame([src, dst])[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxed[3, 0], full_frame([dst])[3], atol=1e-5, rtol=0)  # the spot adds nothing
    assert float(boxed[:3].sum()) > 1000  # the test can fail: real hulls paint


def test_hull_edges_match_scipy_with_repeated_and_collinear_points():
    pts = torch.rand(40, 20, 2, generator=torch.Generator().manual_seed(0)) * 60
    pts[:10, 10:] = pts[:10, :10]  # every point twice
    pts[10:20, 12:, 0] = pts[10:20, 0:1, 0] + torch.linspace(0, 1, 8) * (
        pts[10:20, 1:2, 0] - pts[10:20, 0:1, 0]
    )
    pts[10:20, 12:, 1] = pts[10:20, 0:1, 1] + torch.linspace(0, 1, 8) * (
        pts[10:20, 1:2, 1] - pts[10:20, 0:1, 1]
    )
    batched = hull_signed_distance(pts, 64, 64)
    for i in range(0, 40, 3):
        exact = _hull_distance_np(pts[i].double().numpy(), 64, 64)
        np.testing.assert_allclose(batched[i].numpy(), exact, atol=1e-3)


def test_swap_carries_the_source_expression_onto_the_donor(faces):
    images, lm = faces
    out, out_lm = face_swap(images[:1].float(), lm[:1], images[4:5].float(), lm[4:5], FaceSwapConfig())
    # Inner mouth of the source (dark) now sits at the transformed source mouth; the border is the donor's.
    inner = out_lm[0, 60:68].mean(0).round().long()
    assert out[0, :, inner[1], inner[0]].mean() < 80
    torch.testing.assert_close(out[0, :, :4, :4], images[4, :, :4, :4].float())


def test_similarity_transform_recovers_a_known_one():
    pts = torch.rand(3, 51, 2, generator=torch.Generator().manual_seed(0)) * 100
    angle, scale, shift = 0.3, 1.7, torch.tensor([5.0, -8.0])
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
    mat, t = similarity_transforms(pts, pts @ rot.T + shift)
    torch.testing.assert_close(mat, rot.expand(3, 2, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(t, shift.expand(3, 2), atol=1e-3, rtol=0)


def test_hull_rasterisation_matches_exact_hull(faces):
    _, lm = faces
    for group in HULL_GROUPS:
        batched = hull_signed_distance(lm[:3, list(group)], 128, 128)
        for i in range(3):
            exact = _hull_distance_np(lm[i, list(group)].double().numpy(), 128, 128)  # scipy ConvexHull
            np.testing.assert_allclose(batched[i].numpy(), exact, atol=1e-3)


def test_donors_have_another_identity():
    identity = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    donors = draw_donors(identity, identity, torch.Generator().manual_seed(0))
    assert bool((identity[donors] != identity).all())
    assert draw_donors(torch.tensor([4, 4]), torch.tensor([4, 4]), torch.Generator()).tolist() == [-1, -1]


def test_faceswap_module_probability_dtype_and_determinism(faces):
    images, lm = faces
    identity = torch.arange(8)
    never = FaceSwap(FaceSwapConfig(p=0.0))(images, lm, identity, torch.Generator().manual_seed(0))
    assert torch.equal(never.images, images) and not bool(never.swapped.any())
    swap = FaceSwap(FaceSwapConfig(p=1.0))
    a = swap(images, lm, identity, torch.Generator().manual_seed(3))
    b = swap(images, lm, identity, torch.Generator().manual_seed(3))
    assert a.images.dtype == torch.uint8 and a.images.shape == images.shape and bool(a.swapped.all())
    assert torch.equal(a.images, b.images) and torch.equal(a.donor_index, b.donor_index)
    assert a.landmarks.shape == (8, 68, 2)
    # An explicit donor list is honoured; -1 keeps the source.
    fixed = swap(images, lm, identity, torch.Generator(), donor_index=torch.tensor([1, -1, 3, 2, 5, 4, 7, 6]))
    assert fixed.donor_index[1] == -1 and torch.equal(fixed.images[1], images[1])
    assert not torch.equal(fixed.images[0], images[0])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="faceswap.p"):
        from_dict(FaceSwapConfig, {"p": 2.0})
    with pytest.raises(ConfigError, match="faceswap.color_stride"):
        from_dict(FaceSwapConfig, {"color_stride": 4}, prefix="faceswap.")
