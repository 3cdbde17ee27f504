"""launch/ablation.py: variant selection and the random-init reference backbone."""

from __future__ import annotations

import pytest
import torch

from launch.ablation import VARIANTS, pretrain_cmd, select_variants, slug, write_random_init
from pretrain.model import load_backbone


def test_variants_are_selected_by_exact_slug():
    assert select_variants("timeaug-hardneg-maskfn") == ["timeaug+hardneg+maskfn"]
    assert select_variants("simclr,all") == ["simclr", "all four (SSL-FER)"]
    assert select_variants("all") == list(VARIANTS)
    assert select_variants("sslfer") == ["all four (SSL-FER)"]  # "all" alone means every variant
    with pytest.raises(ValueError, match="unknown \\['timeaug-maskfn'\\]"):
        select_variants("timeaug-maskfn")


def test_set_overrides_come_after_the_variant_so_they_win(tmp_path):
    variant = "all four (SSL-FER)"
    cmd = pretrain_cmd(variant, 1, tmp_path / "run", tmp_path / "data", 300, ["faceswap.p=0.5"])
    assert cmd[-1] == "faceswap.p=0.5" and cmd[-1 - len(VARIANTS[variant]) : -1] == VARIANTS[variant]
    assert "seed=1" in cmd and "max_steps=300" in cmd
    assert pretrain_cmd(variant, 1, tmp_path / "run", tmp_path / "data", 300)[-1] == VARIANTS[variant][-1]


def test_random_init_backbone_is_loadable_seeded_and_carries_its_config(tmp_path):
    write_random_init(tmp_path / "a", seed=3)
    write_random_init(tmp_path / "b", seed=3)
    write_random_init(tmp_path / "c", seed=4)
    a, b, c = (load_backbone(tmp_path / x / "backbone.pt").state_dict() for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert "crop" in (tmp_path / "a" / "config.yaml").read_text()
    assert slug("all four (SSL-FER)") == "all"
