"""The trained encoder, handed off: model.safetensors + config.json that stock torchvision and timm load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from eval.export import export_backbone, main
from pretrain.model import ResNetBackbone, save_backbone


def _run(tmp_path, arch: str, width: int):
    torch.manual_seed(0)
    backbone = ResNetBackbone(arch, width).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_backbone(backbone, run / "backbone.pt")
    config = {
        "seed": 3,
        "max_steps": 100,
        "augment": {"crop": 112, "resize": 128, "mean": [0.5] * 3, "std": [0.25] * 3},
        "sampling": {"strategy": "timeaug"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return backbone, run


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_stock_torchvision_loads_the_export_with_strict_keys_and_same_features(tmp_path, arch):
    import torchvision
    from safetensors.torch import load_file

    backbone, run = _run(tmp_path, arch, 64)
    out = export_backbone(run / "backbone.pt", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == arch and config["torchvision_compatible"] is True
    assert config["preprocessing"]["input_size"] == 112 and config["preprocessing"]["mean"] == [0.5] * 3
    assert config["num_features"] == (512 if arch == "resnet18" else 2048)
    stock = getattr(torchvision.models, arch)()
    stock.fc = torch.nn.Identity()
    stock.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    stock.eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        np.testing.assert_array_equal(stock(images).numpy(), backbone(images).numpy())


def test_timm_loads_the_export(tmp_path):
    import timm
    from safetensors.torch import load_file

    backbone, run = _run(tmp_path, "resnet18", 64)
    out = export_backbone(run / "backbone.pt", tmp_path / "export")
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        np.testing.assert_allclose(model(images).numpy(), backbone(images).numpy(), rtol=1e-5, atol=1e-5)


def test_narrow_backbone_exports_for_the_project_model(tmp_path):
    from safetensors.torch import load_file

    backbone, run = _run(tmp_path, "resnet18", 16)
    out = export_backbone(run / "backbone.pt", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert (
        config["torchvision_compatible"] is False and config["width"] == 16 and config["num_features"] == 128
    )
    again = ResNetBackbone("resnet18", 16)
    again.load_state_dict(load_file(out / "model.safetensors"), strict=True)


def test_missing_run_config_is_one_clear_error(tmp_path, capsys):
    _, run = _run(tmp_path, "resnet18", 16)
    (run / "config.yaml").unlink()
    assert main(["--checkpoint", str(run / "backbone.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "--run-config" in capsys.readouterr().err
