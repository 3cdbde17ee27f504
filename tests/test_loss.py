"""InfoNCE / MaskFN against hand-computed values and an explicit per-row loop reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from pretrain.loss import DistributedInfoNCE, LossConfig, batch_layout, info_nce


def loop_reference(z, positive, tau, desc=None, lam=0.8, mode="none", thr=0.5, groups=None, rows=None):
    """Per row, build the logits list explicitly and take the cross-entropy of its first entry."""
    zn = F.normalize(z.double(), dim=1)
    n = z.shape[0]
    rows = range(n) if rows is None else [int(r) for r in rows]
    total1, total2 = [], []
    for i in rows:
        j = int(positive[i])
        negs = [k for k in range(n) if k not in (i, j)]
        s = lambda a, b: float(zn[a] @ zn[b]) / tau  # noqa: E731
        if desc is not None and mode == "pick":
            dn = F.normalize(desc.double(), dim=1)
            l = max(negs, key=lambda k: float(dn[i] @ dn[k]))  # noqa: E741
            rest = [k for k in negs if k != l]
            lg1 = [s(i, j)] + [s(i, k) for k in rest]
            lg2 = [s(i, l)] + [s(i, k) for k in rest]
            total2.append(-lg2[0] + math.log(sum(math.exp(v) for v in lg2)))
        else:
            if desc is not None and mode == "threshold":
                dn = F.normalize(desc.double(), dim=1)
                negs = [
                    k
                    for k in negs
                    if float(dn[i] @ dn[k]) <= thr
                    or (groups is not None and int(groups[k]) == int(groups[i]))
                ]
            lg1 = [s(i, j)] + [s(i, k) for k in negs]
        total1.append(-lg1[0] + math.log(sum(math.exp(v) for v in lg1)))
    loss = sum(total1) / len(total1)
    if total2:
        loss += lam * sum(total2) / len(total2)
    return loss


def test_hand_computed_orthogonal():
    # Rows 0<->1 identical (cos 1), 2<->3 identical, the two pairs orthogonal (cos 0).
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    positive = torch.tensor([1, 0, 3, 2])
    tau = 0.5
    out = info_nce(z, positive, tau)
    # every row: logits [1/tau, 0, 0] -> CE = -2 + log(e^2 + 2)
    expected = -2.0 + math.log(math.exp(2.0) + 2.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.positive_top1.item() == 1.0
    assert out.negatives_per_row.item() == 2.0


def test_hand_computed_antiparallel_negative():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    positive = torch.tensor([1, 0, 0])
    out = info_nce(z, positive, 1.0, row_indices=torch.tensor([0]))
    # row 0: logits [1, -1]
    assert out.loss.item() == pytest.approx(-1.0 + math.log(math.e + math.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize("layout", ["simclr", "sslfer"])
def test_matches_loop_reference(layout):
    torch.manual_seed(0)
    positive, groups = batch_layout(3, layout)
    z = torch.randn(positive.shape[0], 5)
    out = info_nce(z, positive, 0.1, group_id=groups)
    assert out.loss.item() == pytest.approx(loop_reference(z, positive, 0.1), rel=1e-5)


@pytest.mark.parametrize("mode", ["pick", "threshold"])
def test_maskfn_matches_loop_reference(mode):
    torch.manual_seed(1)
    positive, groups = batch_layout(4, "sslfer")
    z = torch.randn(16, 6)
    desc = torch.randn(16, 4)
    rows = torch.tensor([0, 3, 5, 9, 15])
    out = info_nce(z, positive, 0.07, desc, 0.8, mode, 0.3, group_id=groups, row_indices=rows)
    ref = loop_reference(z, positive, 0.07, desc, 0.8, mode, 0.3, groups, rows)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)
    assert out.rows == 5


def test_maskfn_picks_most_similar_descriptor():
    positive, groups = batch_layout(3, "simclr")  # rows [A0 A1 A2 P0 P1 P2]
    z = torch.randn(6, 8)
    desc = torch.eye(6)
    desc[0] = desc[4] + 0.1 * desc[0]  # row 0 looks like row 4 (P1): the false negative to pick
    desc[2] = desc[1] + 0.2 * desc[2]  # row 2 looks like row 1
    out = info_nce(z, positive, 0.07, desc, group_id=groups)
    assert out.pick_index[0].item() == 4
    assert out.pick_index[2].item() == 1
    # the positive (col 3 for row 0) and the row itself are never picked
    assert all(out.pick_index[i].item() not in (i, positive[i].item()) for i in range(6))


def test_pick_same_group_rate_counts_hard_negatives():
    positive, groups = batch_layout(2, "sslfer")  # rows A0 A1 NA0 NA1 P0 P1 NP0 NP1
    z = torch.randn(8, 4)
    desc = torch.randn(8, 3)
    desc[0] = desc[2]  # A0 looks like NA0: a same-clip hard negative
    out = info_nce(z, positive, 0.07, desc, group_id=groups, row_indices=torch.tensor([0]))
    assert out.pick_index.tolist() == [2]
    assert out.pick_same_group_rate.item() == 1.0


def test_threshold_drops_false_negatives_but_keeps_hard_negatives():
    positive, groups = batch_layout(2, "sslfer")
    z = torch.randn(8, 4)
    desc = torch.ones(8, 3)  # every descriptor identical: cosine 1 > threshold
    out = info_nce(z, positive, 0.07, desc, fn_mode="threshold", fn_threshold=0.5, group_id=groups)
    # Of the 6 negatives per row only the 2 same-clip ones (e.g. NA0, NP0 for A0) survive.
    assert out.negatives_per_row.item() == 2.0
    ref = loop_reference(z, positive, 0.07, desc, mode="threshold", thr=0.5, groups=groups)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


def test_fn_mode_none_ignores_descriptors():
    positive, _ = batch_layout(3, "simclr")
    z = torch.randn(6, 4)
    a = info_nce(z, positive, 0.2, torch.randn(6, 3), fn_mode="none").loss
    b = info_nce(z, positive, 0.2).loss
    assert a.item() == pytest.approx(b.item())


def test_gradient_matches_loop_reference():
    torch.manual_seed(3)
    positive, groups = batch_layout(2, "sslfer")
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    desc = torch.randn(8, 3)
    info_nce(z, positive, 0.5, desc, group_id=groups).loss.backward()
    z2 = z.detach().clone().requires_grad_(True)

    # finite differences of the loop reference
    eps = 1e-6
    num = torch.zeros_like(z2)
    for idx in range(z2.numel()):
        zp = z2.detach().clone().view(-1)
        zp[idx] += eps
        lp = loop_reference(zp.view(8, 3), positive, 0.5, desc, mode="pick")
        zp[idx] -= 2 * eps
        lm = loop_reference(zp.view(8, 3), positive, 0.5, desc, mode="pick")
        num.view(-1)[idx] = (lp - lm) / (2 * eps)
    assert torch.allclose(z.grad, num, atol=1e-5)


def test_distributed_module_single_process_equals_info_nce():
    positive, groups = batch_layout(3, "sslfer")
    z = torch.randn(12, 4)
    desc = torch.randn(12, 2)
    out = DistributedInfoNCE(LossConfig())(z, positive, groups, desc)
    ref = info_nce(z, positive, 0.07, desc, group_id=groups)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_rejects_bad_inputs_and_config():
    with pytest.raises(ValueError, match="own positive"):
        info_nce(torch.randn(3, 2), torch.tensor([0, 2, 1]), 0.1)
    with pytest.raises(ConfigError, match="loss.temperature"):
        LossConfig(temperature=0).validate()
    with pytest.raises(ConfigError, match="loss.fn_threshold"):
        LossConfig(fn_threshold=2.0).validate()


# ---- mouth-eye descriptors (the MaskFN inputs) ----


def _similarity(points, angle, scale, shift):
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=points.dtype)
    return points @ rot.T * scale + torch.tensor(shift, dtype=points.dtype)


def _with_open_mouth(shape, amount):
    face = shape.clone()
    face[[55, 56, 57, 58, 59, 65, 66, 67], 1] += amount  # jaw drop: lower lip moves down
    return face


def test_landmark_descriptor_ignores_pose_and_size():
    from pretrain.descriptors import MEAN_SHAPE, landmark_descriptor

    face = _with_open_mouth(MEAN_SHAPE, 0.05)
    moved = _similarity(face, 0.3, 140.0, (60.0, 55.0))  # pixel frame, rotated
    d = landmark_descriptor(torch.stack([face, moved]))
    assert d.shape == (2, 84)
    assert torch.allclose(d[0], d[1], atol=1e-5)


def test_maskfn_with_landmark_descriptors_picks_same_expression():
    from pretrain.descriptors import MEAN_SHAPE, landmark_descriptor

    torch.manual_seed(5)
    faces = []
    for k in range(6):  # rows 0,3 open mouth; others neutral-ish with identity-like jitter
        base = MEAN_SHAPE + 0.004 * torch.randn(68, 2)
        faces.append(_with_open_mouth(base, 0.06 if k in (0, 3) else 0.0))
    desc = landmark_descriptor(torch.stack(faces))
    positive = torch.tensor([1, 0, 4, 5, 2, 3])  # row 3 is not row 0's positive: it is a false negative
    out = info_nce(torch.randn(6, 8), positive, 0.07, desc)
    assert out.pick_index[0].item() == 3


def test_transform_landmarks_crop_and_flip():
    from pretrain.descriptors import MEAN_SHAPE, MIRROR, transform_landmarks

    pts = (MEAN_SHAPE * 100 + 64).expand(2, 68, 2)
    boxes = torch.tensor([[8.0, 8.0, 120.0, 120.0], [8.0, 8.0, 120.0, 120.0]])
    out = transform_landmarks(pts, boxes, torch.tensor([False, True]), 112)
    assert torch.allclose(out[0], (pts[0] - 8.0) * 1.0)
    # the template is symmetric about x = 64 -> 56 in the crop, so a flip maps it onto itself
    assert torch.allclose(out[1], out[0], atol=1e-4)
    assert sorted(MIRROR) == list(range(68)) and all(MIRROR[MIRROR[i]] == i for i in range(68))


def test_cnn_descriptor_loads_user_weights(tmp_path):
    from torchvision.models import resnet18

    from pretrain.descriptors import MEAN_SHAPE, CNNDescriptor, DescriptorConfig, DescriptorError

    with pytest.raises(DescriptorError, match="descriptors.weights_path"):
        CNNDescriptor(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="descriptors.weights_path"):
        DescriptorConfig(kind="cnn", weights_path=str(tmp_path / "missing.pt")).validate()
    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    torch.save(resnet18(weights=None).state_dict(), path)
    model = CNNDescriptor(path, crop_size=32)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    lms = (MEAN_SHAPE * 40 + 32).expand(2, 68, 2)
    d = model(images, lms)
    assert d.shape == (2, 1024) and torch.isfinite(d).all()
    assert torch.allclose(model(images, lms), d)  # frozen, deterministic


def test_cnn_descriptor_takes_a_pretraining_backbone(tmp_path):
    """A run's backbone.pt (here a width-8 ResNet-18) is a descriptor network too: its own feature size, the
    eye and mouth crops through exactly that backbone; anything else is one clear error."""
    from torchvision.ops import roi_align

    from pretrain.descriptors import (
        EYE_REGION,
        MEAN_SHAPE,
        MOUTH,
        CNNDescriptor,
        DescriptorError,
        _region_boxes,
    )
    from pretrain.model import ModelConfig, build_backbone, load_backbone, save_backbone

    torch.manual_seed(0)
    path = save_backbone(build_backbone(ModelConfig(arch="resnet18", width=8)), tmp_path / "backbone.pt")
    model = CNNDescriptor(path, crop_size=32)
    images = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    lms = (MEAN_SHAPE * 40 + 32).expand(3, 68, 2)
    d = model(images, lms)
    backbone = load_backbone(path)
    x = (images.float() / 255 - model.mean) / model.std
    index = torch.arange(3, dtype=torch.float32)[:, None]
    expected = [
        backbone(roi_align(x, torch.cat([index, _region_boxes(lms, pts, 0.25)], 1), 32, aligned=True))
        for pts in (EYE_REGION, MOUTH)
    ]
    assert d.shape == (3, 2 * expected[0].shape[1]) and torch.allclose(d, torch.cat(expected, 1), atol=1e-6)
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DescriptorError, match="neither a torchvision resnet18"):
        CNNDescriptor(tmp_path / "other.pt")


def _donor_reference(z, positive, groups, donor_row, tau):
    """Per row, the logits list without the donor clip's rows for both rows of each swapped pair."""
    zn = F.normalize(z.double(), dim=1)
    n = z.shape[0]
    dropped = {i: set() for i in range(n)}
    for i in range(n):
        if int(donor_row[i]) >= 0:
            donor_group = int(groups[int(donor_row[i])])
            clip_rows = {k for k in range(n) if int(groups[k]) == donor_group}
            dropped[i] |= clip_rows
            dropped[int(positive[i])] |= clip_rows
    total = []
    for i in range(n):
        j = int(positive[i])
        negs = [k for k in range(n) if k not in (i, j) and k not in dropped[i]]
        logits = [float(zn[i] @ zn[j]) / tau] + [float(zn[i] @ zn[k]) / tau for k in negs]
        total.append(-logits[0] + math.log(sum(math.exp(v) for v in logits)))
    return sum(total) / n


def test_drop_donor_columns_matches_loop_reference():
    """sslfer layout, 3 clips (12 rows): P of clip 0 swapped onto a frame of clip 2, NP of clip 1 onto clip 0."""
    from pretrain.loss import donor_linked_groups

    torch.manual_seed(0)
    positive, groups = batch_layout(3, "sslfer")
    z = torch.randn(12, 5, requires_grad=True)
    donor_row = torch.full((12,), -1)
    donor_row[6], donor_row[10] = 2, 0  # P0 (row 6) <- row 2 (A2); NP1 (row 10) <- row 0 (A0)
    linked = donor_linked_groups(positive, groups, donor_row)
    assert linked.tolist() == [2, -1, -1, -1, 0, -1, 2, -1, -1, -1, 0, -1]  # A0/P0 -> clip 2, NA1/NP1 -> 0
    cfg = LossConfig(temperature=0.1, drop_donor_columns=True)
    out = DistributedInfoNCE(cfg)(z, positive, groups, None, donor_row)
    assert out.loss.item() == pytest.approx(_donor_reference(z, positive, groups, donor_row, 0.1), rel=1e-6)
    # 4 rows lose the 4 rows of one clip each: 12 rows x 10 negatives - 16
    assert out.negatives_per_row.item() == pytest.approx((12 * 10 - 16) / 12)
    plain = DistributedInfoNCE(LossConfig(temperature=0.1))(z, positive, groups, None, donor_row)
    assert plain.negatives_per_row.item() == 10.0 and plain.loss.item() != pytest.approx(out.loss.item())
    none_linked = DistributedInfoNCE(cfg)(z, positive, groups, None, torch.full((12,), -1))
    assert none_linked.loss.item() == pytest.approx(plain.loss.item(), rel=1e-7)  # no in-batch donor: no-op
    with pytest.raises(ValueError, match="group_id"):
        info_nce(z, positive, 0.1, drop_group=linked)
