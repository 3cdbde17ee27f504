"""Batched FaceSwap (pretrain/faceswap.py) against its per-sample NumPy/SciPy reference, on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from launch.configio import ConfigError, from_dict
from pretrain.faceswap import (
    HULL_GROUPS,
    FaceSwap,
    FaceSwapConfig,
    _hull_distance_np,
    draw_donors,
    face_swap,
    face_swap_reference,
    hull_signed_distance,
    similarity_transforms,
    toy_faces,
)


@pytest.fixture(scope="module")
def faces():
    return toy_faces(8, 128, torch.Generator().manual_seed(1))


def test_batched_matches_reference_inside_the_mask(faces):
    images, lm = faces
    cfg = FaceSwapConfig()
    src, dst = [0, 1, 2], [5, 6, 7]
    out, out_lm = face_swap(images[src].float(), lm[src], images[dst].float(), lm[dst], cfg)
    for k, (i, j) in enumerate(zip(src, dst)):
        ref, ref_lm, mask = face_swap_reference(
            images[i].permute(1, 2, 0).double().numpy(), lm[i].double().numpy(),
            images[j].permute(1, 2, 0).double().numpy(), lm[j].double().numpy(), cfg,
        )  # fmt: skip
        diff = np.abs(out[k].permute(1, 2, 0).numpy() - ref)
        # Tolerance: < 2 grey levels on average inside the mask (the two differ in kernel truncation, the hull
        # approximation near corners and float32 vs float64), landmarks to 1e-3 px.
        assert diff[mask > 0.5].mean() < 2.0
        assert diff.mean() < 1.0
        np.testing.assert_allclose(out_lm[k].numpy(), ref_lm, atol=1e-3)


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
