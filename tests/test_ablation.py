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


def test_report_uses_sample_std_and_paired_t_intervals():
    """Known numbers: seeds 0-4, SimCLR 20..24, the method 2 + SimCLR + noise -> the 95% interval by hand."""
    from scipy import stats

    from launch.ablation import BASELINE, aggregate, paired_difference, per_seed

    noise = [0.5, -0.5, 1.0, -1.0, 0.0]
    results = {"results": {}}
    for seed in range(5):
        for name, value in ((f"simclr-s{seed}", 20 + seed), (f"all-s{seed}", 22 + seed + noise[seed])):
            results["results"][name] = {
                "expression": {"d": {"metrics": {"linear_macro_f1": {"mean": value / 100}}}}
            }
    runs = {
        BASELINE: [f"simclr-s{s}" for s in range(5)],
        "all four (SSL-FER)": [f"all-s{s}" for s in range(5)],
    }
    mean, sd, n = aggregate(results, runs)[BASELINE]["expr macro-F1"]
    assert (mean, n) == (pytest.approx(22.0), 5) and sd == pytest.approx(float(torch.arange(20, 25.0).std()))
    seeds = per_seed(results, runs)
    diff = paired_difference(seeds["all four (SSL-FER)"]["expr macro-F1"], seeds[BASELINE]["expr macro-F1"])
    half = stats.t.ppf(0.975, 4) * float(torch.tensor(noise).std()) / 5**0.5
    assert diff["mean"] == pytest.approx(2.0) and diff["n"] == 5
    assert diff["low"] == pytest.approx(2.0 - half) and diff["high"] == pytest.approx(2.0 + half)
    assert paired_difference({0: 1.0}, {0: 0.0}) is None  # one seed: no interval
