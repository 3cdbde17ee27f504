"""Encoder: a torchvision-style ResNet backbone plus the contrastive projection head.

Plain ``nn.Module`` objects: nothing here knows about DeepSpeed, ranks or devices.
``width`` scales the stem (64 in the paper's ResNets) so CPU smoke runs can use a 16-wide ResNet-18.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from common.errors import ConfigError

ARCH_LAYERS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # torchvision ResNet depth
    width: int = 64  # channels of the stem; 64 is torchvision's ResNet
    projector_dims: list[int] = field(default_factory=lambda: [512, 128])  # hidden..., output
    weights_path: str | None = None  # optional backbone state_dict to start from (no downloads)
    channels_last: bool = False  # memory format on GPU; harmless on CPU

    def validate(self) -> None:

        if self.width < 4 or self.width % 4:
            raise ConfigError(f"config key 'model.width': must be a positive multiple of 4, got {self.width}")
        if not self.projector_dims or any(d <= 0 for d in self.projector_dims):
            raise ConfigError(
                f"config key 'model.projector_dims': positive sizes needed, got {self.projector_dims}"
            )
        if self.weights_path and not Path(self.weights_path).is_file():
            raise ConfigError(
                f"config key 'model.weights_path': file '{self.weights_path}' does not exist "
                "(give a local backbone state_dict, or null for random init)"
            )


class ResNetBackbone(ResNet):
    """torchvision ResNet with a configurable stem width and no classifier: returns pooled features."""

    def __init__(self, arch: str, width: int = 64):
        block, layers = ARCH_LAYERS[arch]
        super().__init__(block, layers)
        if width != 64:
            # Rebuild the trunk at another width, reusing torchvision's blocks and initialisation.
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self._make_layer(block, width, layers[0])
            self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
            self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
            self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        self.feature_dim = width * 8 * block.expansion
        self.arch = arch
        self.width = width
        del self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """SimCLR head: (Linear-BN-ReLU) per hidden size, then a plain Linear to the embedding size."""
    layers: list[nn.Module] = []
    prev = in_dim
    for hidden in dims[:-1]:
        layers += [nn.Linear(prev, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        prev = hidden
    layers.append(nn.Linear(prev, dims[-1]))
    return nn.Sequential(*layers)


class ContrastiveEncoder(nn.Module):
    """Backbone + projector; ``forward`` returns un-normalised embeddings (the loss normalises)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.projector = build_projector(self.backbone.feature_dim, list(cfg.projector_dims))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))


def build_backbone(cfg: ModelConfig) -> ResNetBackbone:
    backbone = ResNetBackbone(cfg.arch, cfg.width)
    if cfg.weights_path:
        state = torch.load(cfg.weights_path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        backbone.load_state_dict(state)
    return backbone


def save_backbone(backbone: nn.Module, path: str | Path) -> Path:
    """A plain fp32 ``state_dict`` on CPU: what evaluation loads."""
    path = Path(path)
    state = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
        for k, v in backbone.state_dict().items()
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def infer_model_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Recover arch and width from a backbone state_dict (block counts and stem channels)."""
    width = int(state["conv1.weight"].shape[0])
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    for arch, (block, layers) in ARCH_LAYERS.items():
        if layers == blocks and (block is Bottleneck) == bottleneck:
            return ModelConfig(arch=arch, width=width)
    raise ValueError(
        f"backbone state_dict matches no known arch (blocks per stage {blocks}, bottleneck={bottleneck})"
    )


def load_backbone(path: str | Path) -> ResNetBackbone:
    """Load ``backbone.pt`` (plain state_dict) into the matching architecture, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone file '{path}' does not exist (pretraining writes RUN_DIR/backbone.pt)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = ResNetBackbone(
        **{k: v for k, v in vars(infer_model_config(state)).items() if k in ("arch", "width")}
    )
    backbone.load_state_dict(state)
    return backbone.eval()
